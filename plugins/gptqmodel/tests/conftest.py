"""Makes gptqmodel_helpers (what test_gptq.py and test_awq.py share) importable under --import-mode=importlib."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
