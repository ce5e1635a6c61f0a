import sys
from pathlib import Path

# the helpers that build shipped/derived models live next to them in models/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
