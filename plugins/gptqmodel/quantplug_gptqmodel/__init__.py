"""quantplug backends over gptqmodel's quantized layers: ``gptq`` and ``awq``, one dist.

gptqmodel builds both kinds of layer, so one distribution,
``quantplug-gptqmodel``, declares both backends through two entry points in
group ``quantplug.backends``, each naming its own plugin module:

- ``gptq = "quantplug_gptqmodel.gptq"``: GPTQ layers (``TorchLinear``,
  ``TorchAtenLinear``, Marlin, ...);
- ``awq = "quantplug_gptqmodel.awq"``: AWQ layers (``AwqTorchLinear``, ...,
  and AutoAWQ's ``WQLinear_GEMM``).

What both use lives beside them, private to this dist: ``_classes``
(class-name detection and variant parsing, no torch import), ``_torch``
(layouts both have, reading a layer through its forward, the adapter layer's
base call) and ``_compat`` (what moved between gptqmodel releases, probed).
Importing this package imports neither torch nor gptqmodel.
"""
