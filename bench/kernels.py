"""DeepBench-style kernel table: our fused ops against the ATen compositions they replace, on the real shapes of
R50-D8 at 512x512, plus the convolution table. Every ratio is measured side by side in the same run.

    python bench/kernels.py                   # all sections, on CUDA if present, else CPU
    python bench/kernels.py --quick           # tiny shapes: proves the script runs (CI)
    python bench/kernels.py --only bn_relu    # one section: bn_relu | upsample | conv
    python bench/kernels.py --out DIR         # also write DIR/kernels.md and DIR/kernels.json
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = {}  # name -> fn(args, device) returning (markdown table str, list of row dicts)

# ---- section: bn_relu (Kernels I)

# ---- section: upsample (Kernels II)

# ---- section: conv (benchmarks issue)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (CI)")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="folder for kernels.md / kernels.json")
    args = p.parse_args()
    import torch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = args.only.split(",") if args.only else list(SECTIONS)
    md, rows = [], {}
    for name in names:
        table, section_rows = SECTIONS[name](args, device)
        print(table, flush=True)
        md.append(table)
        rows[name] = section_rows
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels.md"), "w") as f:
            f.write("\n\n".join(md) + "\n")
        with open(os.path.join(args.out, "kernels.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
