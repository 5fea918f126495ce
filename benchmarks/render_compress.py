"""Merge compress_quality.py JSON result files into one markdown table: python benchmarks/render_compress.py a.json b.json"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from compress_quality import render  # noqa: E402

results = [r for f in sys.argv[1:] for r in json.loads(Path(f).read_text())]
print(render(results))
