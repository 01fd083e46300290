#!/usr/bin/env python
"""Write the built-in synthetic multi-domain dataset in the Amazon 2018 raw format.

Example:  python tools/synth.py out=data/raw items_per_domain=2000
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from ant_dist.config import SynthConfig, parse_cli  # noqa: E402
from ant_dist.data.synth import __doc__ as SYNTH_DOC, synthesize  # noqa: E402


def main(argv=None) -> int:
    cfg = parse_cli(SynthConfig, argv, "tools/synth.py", SYNTH_DOC)
    try:
        manifest = synthesize(cfg)
    except ValueError as exc:  # a bad knob value: refused before anything is written
        print(f"tools/synth.py: error: {exc}", file=sys.stderr)
        return 2
    for role in ("aux", "target"):
        for d in manifest[role]:
            print(f"{role:6s} {d['name']:12s} {d['items']:>8,} items {d['users']:>9,} users "
                  f"{d['interactions_written']:>11,} interactions")
    print(f"wrote {cfg.out}/synth_manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
