"""Write params.yaml, the composed config that dvc.yaml's stages read, exactly as DVC composes it.

`dvc exp run -S key=value` recomposes params.yaml from conf/ through DVC's Hydra integration
(.dvc/config: hydra.enabled); plain `dvc repro` reads the committed file. After editing conf/
or a config schema, regenerate it (tests/test_dvc.py fails while it is stale):

    python -m pipeline.dvc_params                 # params.yaml = conf/ with no overrides
    python -m pipeline.dvc_params --check         # exit 1 if params.yaml is stale
    python -m pipeline.dvc_params quant.bits=2    # any Hydra overrides, like dvc exp run -S
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent


def compose_params(overrides: list[str], conf_dir: Path = REPO / "conf", plugins_dir: Path = REPO) -> str:
    """The YAML text DVC writes to params.yaml for `dvc exp run -S <overrides>`.

    Args:
        overrides: Hydra overrides, e.g. ["quant.bits=2", "+experiment=smollm2_w2_g64"].
        conf_dir: the Hydra config folder (.dvc/config hydra.config_dir).
        plugins_dir: where DVC looks for hydra_plugins (the repository root).
    """
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(Path(conf_dir).resolve()), None, "config", str(Path(plugins_dir).resolve()),
                         overrides)
        return out.read_text()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.dvc_params", description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for dvc exp run -S")
    parser.add_argument("--output", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 when stale")
    args = parser.parse_args(argv)
    text = compose_params(args.overrides)
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is stale: regenerate it with python -m pipeline.dvc_params", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
