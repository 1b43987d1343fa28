"""Main job (placeholder until the geometry core lands): load the model and print its shape."""

from __future__ import annotations

import argparse
import sys

import steerjax as sj


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="HF folder, cached HF model id or .gguf (default: SmolLM2)")
    args = parser.parse_args(argv)
    try:
        lm = sj.load_model(args.model)
    except sj.SteerjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = lm.config
    print(f"{lm.source}: {c.model_type}, L={c.num_layers}, d={c.hidden_size}, V={c.vocab_size}, "
          f"heads={c.num_heads}/{c.num_kv_heads}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
