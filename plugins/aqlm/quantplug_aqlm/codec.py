"""Encoding dense weights in AQLM's format, without calibration data.

AQLM stores a weight as, per group of ``out_group_size x in_group_size``
entries, the sum of one vector from each of ``num_codebooks`` learned
codebooks of ``2^nbits`` entries, times a scale per output group. The aqlm
package only runs such layers; its quantizer (the paper's repository) needs
calibration data and a GPU. This module is the small calibration-free
version quantplug needs:

- :func:`quantize` (``quantplug_quantize``): per-output-group RMS scales,
  then residual k-means (a few Lloyd iterations per codebook, on at most
  ``64 * 2^nbits`` sampled groups), then :func:`encode`.
- :func:`requantize` (``quantplug_requantize``): keep the layer's codebooks,
  group sizes and dtype; :func:`encode` the merged weight starting from the
  layer's current codes and scales.
- :func:`encode`: coordinate descent. For each codebook in turn, the code
  of every group is replaced by the entry nearest to what the other
  codebooks leave unexplained, but only when that is strictly closer; then
  each output group's scale is refit by least squares. Every step lowers
  (or keeps) ``‖scale * decode(codes) - W‖``, so requantizing never ends
  further from the target than the codes it started from, and requantizing
  an unchanged weight gives back the same codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

CHUNK_ELEMENTS = 1 << 24  # group x codebook-entry scores computed at once (64 MiB in float32)
PROGRESS_WORK = 1 << 34  # multiply-adds past which a progress bar is shown (several seconds on a CPU core)
MAX_FIT_PER_ENTRY = 64  # k-means fits on at most this many sampled groups per codebook entry


@dataclass(frozen=True)
class Format:
    """An AQLM layout: ``num_codebooks`` codebooks of ``2^nbits`` vectors of ``out_group_size x in_group_size``."""

    num_codebooks: int
    nbits: int
    in_group_size: int
    out_group_size: int = 1

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits

    @classmethod
    def of(cls, module) -> Format:
        return cls(
            module.num_codebooks, module.nbits_per_codebook, module.in_group_size, module.out_group_size
        )


# variant name -> format; the first is the default. "CxB-gG": C codebooks of 2^B entries over G inputs.
VARIANTS = {
    "2x8-g8": Format(2, 8, 8),  # 2 bits per weight; the 2x8 format of the published AQLM models
    "1x8-g8": Format(1, 8, 8),  # 1 bit per weight
    "1x16-g8": Format(
        1, 16, 8
    ),  # 2 bits per weight, AQLM's most accurate 2-bit format; 2^16 entries: slow to fit
}


def to_groups(weight: torch.Tensor, out_group_size: int, in_group_size: int) -> torch.Tensor:
    """``(out, in)`` -> ``(out_groups, in_groups, out_group_size * in_group_size)``, aqlm's group order."""
    out_features, in_features = weight.shape
    return (
        weight.reshape(
            out_features // out_group_size, out_group_size, in_features // in_group_size, in_group_size
        )
        .permute(0, 2, 1, 3)
        .reshape(out_features // out_group_size, in_features // in_group_size, out_group_size * in_group_size)
    )


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Codes in ``[0, 2^nbits)`` to aqlm's signed storage, as ``aqlm.utils.pack_int_data`` does.

    Not ``pack_int_data`` itself: it runs under ``torch.inference_mode()`` and
    so returns an inference tensor, which a later in-place update (or an
    autograd graph) outside inference mode rejects.
    """
    from aqlm.utils import get_int_dtype

    wrapped = torch.where(codes >= 2 ** (nbits - 1), codes - 2**nbits, codes)
    return wrapped.to(get_int_dtype(nbits))


def decode(book: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``sum_c book[c][codes[..., c]]``: ``book`` is ``(C, K, d)``, ``codes`` ``(..., C)``; unscaled."""
    out = book[0][codes[..., 0]]
    for c in range(1, book.shape[0]):
        out = out + book[c][codes[..., c]]
    return out


def _nearest(
    points: torch.Tensor,
    book: torch.Tensor,
    book_sq: torch.Tensor,
    bar,
    current: torch.Tensor | None = None,
    radius: torch.Tensor | None = None,
) -> torch.Tensor:
    """Index of the nearest ``book`` row for each of ``points``.

    :param current: the index each point has now, kept unless another entry is strictly closer.
    :param radius: per entry, a lower bound on half its distance to the nearest other entry
        (:func:`_radii`). A point closer than that to its current entry has no strictly closer
        one (triangle inequality) and is not searched: after a small update nearly every group
        stays, so requantizing a big layer costs little more than a decode.
    """
    found = (
        torch.empty(points.shape[0], dtype=torch.long, device=points.device)
        if current is None
        else current.clone()
    )
    todo = None
    if current is not None and radius is not None:
        distance = (points - book[current]).square().sum(1).sqrt()
        todo = (distance >= radius[current]).nonzero().squeeze(1)
        bar.update(points.shape[0] - todo.numel())
        points = points[todo]
    step = max(1, CHUNK_ELEMENTS // book.shape[0])
    for start in range(0, points.shape[0], step):
        chunk = points[start : start + step]
        rows = slice(start, start + chunk.shape[0]) if todo is None else todo[start : start + step]
        candidate = torch.addmm(book_sq, chunk, book.T, alpha=-2).argmin(dim=1)  # ‖b‖² - 2<p, b>
        if current is not None:
            # the expansion above rounds; compare the two choices exactly before leaving the old one
            old = current[rows]
            better = (chunk - book[candidate]).square().sum(1) < (chunk - book[old]).square().sum(1)
            candidate = torch.where(better, candidate, old)
        found[rows] = candidate
        bar.update(chunk.shape[0])
    return found


def _radii(book: torch.Tensor, book_sq: torch.Tensor) -> torch.Tensor:
    """Per ``book`` row, half its distance to the nearest other row, rounded down to stay a lower bound."""
    size = book.shape[0]
    step = max(1, CHUNK_ELEMENTS // size)
    radius = torch.empty(size, dtype=book.dtype, device=book.device)
    largest = book_sq.max()
    for start in range(0, size, step):
        count = min(step, size - start)
        squared = (
            torch.addmm(book_sq, book[start : start + count], book.T, alpha=-2)
            + book_sq[start : start + count, None]
        )
        squared[torch.arange(count), torch.arange(start, start + count)] = float("inf")
        # the expansion loses a few ulps of ‖a‖² + ‖b‖²; take that off before trusting it
        low = squared.min(dim=1).values - 1e-5 * (book_sq[start : start + count] + largest)
        radius[start : start + count] = low.clamp_min(0).sqrt() / 2
    return radius


def kmeans(points: torch.Tensor, size: int, iterations: int, generator: torch.Generator, bar) -> torch.Tensor:
    """``size`` centroids of ``points`` (``(N, d)``) by Lloyd's algorithm from a random sample."""
    count, dim = points.shape
    if count > MAX_FIT_PER_ENTRY * size:
        points = points[
            torch.randperm(count, generator=generator)[: MAX_FIT_PER_ENTRY * size].to(points.device)
        ]
        count = points.shape[0]
    if count <= size:
        # no more groups than entries (a 2^16 codebook on a small layer): every group is an entry,
        # and the spare entries are Gaussian draws with the groups' mean and spread; Lloyd would
        # change nothing
        noise = torch.randn(size - count, dim, generator=generator).to(points)
        spare = points.mean(0) + noise * points.std(0, correction=0)
        bar.update(iterations * count)
        return torch.cat([points, spare])
    centroids = points[torch.randperm(count, generator=generator)[:size].to(points.device)].clone()
    for _ in range(iterations):
        assign = _nearest(points, centroids, centroids.square().sum(1), bar)
        sums = torch.zeros_like(centroids).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=size)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(sums)
    return centroids


def encode(
    weight: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    *,
    iterations: int = 3,
    refit_scales: bool = True,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales that bring ``scales * decode(codes)`` closer to ``weight`` with fixed codebooks.

    :param weight: ``(out_features, in_features)`` target.
    :param codebooks: ``(C, K, out_group_size, in_group_size)``, left unchanged.
    :param codes: ``(out_groups, in_groups, C)`` int64 in ``[0, K)``: where the search starts.
    :param scales: one per output group: where the search starts.
    :param iterations: rounds of (every codebook, then the scales).
    :param refit_scales: refit each output group's scale by least squares after each round.
    :param progress: show a progress bar; default: when the search is big.
    :returns: ``(codes, scales)``, int64 ``(out_groups, in_groups, C)`` and float32 ``(out_groups,)``.
    """
    num_codebooks, size, out_group_size, in_group_size = codebooks.shape
    target = to_groups(weight.detach().float(), out_group_size, in_group_size)
    out_groups, in_groups, dim = target.shape
    book = codebooks.detach().float().reshape(num_codebooks, size, dim).to(target.device)
    book_sq = book.square().sum(-1)
    codes = codes.to(device=target.device, dtype=torch.long).clone()
    # the bound (see _nearest) costs one search per codebook entry: worth it once groups outnumber entries
    bounded = out_groups * in_groups >= size
    radii = [_radii(book[c], book_sq[c]) if bounded else None for c in range(num_codebooks)]
    scales = scales.detach().float().reshape(out_groups).to(target.device).clone()
    work = iterations * num_codebooks * out_groups * in_groups * size * dim
    # progress=True shows the bar anywhere; by default a big search shows it on a terminal only (tqdm's None)
    disable = not progress if progress is not None else (None if work >= PROGRESS_WORK else True)
    total = iterations * num_codebooks * out_groups * in_groups
    with tqdm(total=total, desc="aqlm requantize", unit="group", disable=disable) as bar:
        for _ in range(iterations):
            # with the scale fixed, each group's error is scale² ‖target/scale - decoded‖²
            usable = torch.where(
                scales.abs() > torch.finfo(torch.float32).tiny, scales, torch.ones_like(scales)
            )
            goal = target / usable.view(-1, 1, 1)
            changed = False
            for c in range(num_codebooks):
                decoded = decode(book, codes)
                residual = goal - decoded + book[c][codes[..., c]]
                new = _nearest(
                    residual.reshape(-1, dim), book[c], book_sq[c], bar, codes[..., c].reshape(-1), radii[c]
                )
                new = new.view(out_groups, in_groups)
                if not torch.equal(new, codes[..., c]):
                    codes[..., c] = new
                    changed = True
            rescaled = False
            if refit_scales:
                decoded = decode(book, codes)
                dot = (target * decoded).sum((1, 2))
                norm = decoded.square().sum((1, 2))
                fitted = torch.where(norm > 0, dot / norm.clamp_min(torch.finfo(torch.float32).tiny), scales)
                # move a scale only where that lowers its group's error by more than float rounding,
                # so requantizing an unchanged weight returns the very same scales
                before = (target - scales.view(-1, 1, 1) * decoded).square().sum((1, 2))
                after = (target - fitted.view(-1, 1, 1) * decoded).square().sum((1, 2))
                better = after < before * (1 - 1e-5)
                rescaled = bool(better.any())
                scales = torch.where(better, fitted, scales)
            if not (changed or rescaled):
                bar.update(bar.total - bar.n)
                break
    return codes, scales


def build(in_features: int, out_features: int, fmt: Format, codebooks, codes, scales, bias):
    """A new ``aqlm.QuantizedLinear`` holding these tensors (copied), on the codebooks' device and dtype."""
    import aqlm
    from torch import nn

    layer = aqlm.QuantizedLinear(
        in_features,
        out_features,
        fmt.in_group_size,
        fmt.out_group_size,
        fmt.num_codebooks,
        fmt.nbits,
        bias=bias is not None,
        device=codebooks.device,
        dtype=codebooks.dtype,
    )
    with torch.no_grad():
        layer.codebooks.copy_(codebooks)
        layer.codes.copy_(pack_codes(codes, fmt.nbits))
        layer.scales.copy_(scales.reshape(-1, 1, 1, 1))
    if bias is not None:  # kept in its own dtype, bit for bit
        layer.bias = nn.Parameter(bias.detach().clone().to(codebooks.device), requires_grad=False)
    return layer


def quantize(
    linear,
    fmt: Format,
    *,
    lloyd_iterations: int = 8,
    iterations: int = 3,
    seed: int = 0,
    progress: bool | None = None,
):
    """Quantize a dense ``nn.Linear`` into a new ``aqlm.QuantizedLinear`` (float32 math, the weight's dtype)."""
    weight = linear.weight.detach()
    out_features, in_features = weight.shape
    if in_features % fmt.in_group_size or out_features % fmt.out_group_size:
        raise ValueError(
            f"aqlm groups of {fmt.out_group_size}x{fmt.in_group_size} do not tile a "
            f"{out_features}x{in_features} weight; both sizes must be multiples"
        )
    generator = torch.Generator().manual_seed(seed)
    target = to_groups(weight.float(), fmt.out_group_size, fmt.in_group_size)
    out_groups, in_groups, dim = target.shape
    scales = target.square().mean((1, 2)).sqrt()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    residual = (target / scales.view(-1, 1, 1)).reshape(-1, dim)
    books, codes = [], []
    fit = min(residual.shape[0], MAX_FIT_PER_ENTRY * fmt.codebook_size)
    work = fmt.num_codebooks * (lloyd_iterations * fit + residual.shape[0]) * fmt.codebook_size * dim
    # progress=True shows the bar anywhere; by default a big search shows it on a terminal only (tqdm's None)
    disable = not progress if progress is not None else (None if work >= PROGRESS_WORK else True)
    total = fmt.num_codebooks * (lloyd_iterations * fit + residual.shape[0])
    with tqdm(total=total, desc="aqlm codebooks", unit="group", disable=disable) as bar:
        for _ in range(fmt.num_codebooks):  # residual vector quantization
            book = kmeans(residual, fmt.codebook_size, lloyd_iterations, generator, bar)
            assign = _nearest(residual, book, book.square().sum(1), bar)
            residual = residual - book[assign]
            books.append(book)
            codes.append(assign)
    codebooks = torch.stack(books).reshape(
        fmt.num_codebooks, fmt.codebook_size, fmt.out_group_size, fmt.in_group_size
    )
    codes = torch.stack(codes, dim=-1).reshape(out_groups, in_groups, fmt.num_codebooks)
    codes, scales = encode(weight, codebooks, codes, scales, iterations=iterations, progress=progress)
    return build(
        in_features,
        out_features,
        fmt,
        codebooks.to(weight.dtype),
        codes,
        scales.to(weight.dtype),
        linear.bias,
    )


def requantize(
    module,
    weight: torch.Tensor,
    *,
    iterations: int = 3,
    refit_scales: bool = True,
    progress: bool | None = None,
):
    """A new layer with ``module``'s codebooks, format, dtype and bias whose codes (and scales) encode ``weight``."""
    from quantplug_aqlm import layout

    codebooks = module.codebooks.detach()
    codes, scales = encode(
        weight.to(codebooks.device),
        codebooks,
        layout.unpacked_codes(module),
        module.scales.detach(),
        iterations=iterations,
        refit_scales=refit_scales,
        progress=progress,
    )
    return build(
        module.in_features,
        module.out_features,
        Format.of(module),
        codebooks.clone(),
        codes,
        scales.to(module.scales.dtype),
        module.bias,
    )
