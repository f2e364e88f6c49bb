"""Serial vs ISO prefill of serving batches: ragged prompts packed into one token stream over paged KV caches,
chunks cut by token count (so a long request may straddle a cut), measured end to end by ``engine.run``.

Batches: ``mixed`` (a few long prompts and many short ones), ``uniform`` (equal prompts, packed the same way)
and ``prefix`` (the mixed batch continuing a cached shared prefix, whose K/V are computed before the timing).
Each point is one ``engine.run`` with mode "both": serial and ISO interleaved, ``--split auto`` (the split
trial among even splits of 1-4 chunks).

    python bench/bench_serving.py [--quick] [--links ratio:0.5,ratio:1.0] [--model NAME] [--repeats N]
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench import common
from iso_kernels import comm, engine

# name -> (prompt lengths, cached prefix): 2048 tokens in each batch; the mixed batch's second prompt spans the
# middle of the stream, so an even two-chunk cut goes through it.
BATCHES = {
    "mixed": ([768, 1024] + [32] * 8, 0),
    "uniform": ([256] * 8, 0),
    "prefix": ([768, 1024] + [32] * 8, 256),
}
QUICK_BATCHES = {"mixed": ([96, 48] + [8] * 4, 0), "prefix": ([96, 48] + [8] * 4, 32)}
LINKS = ["ratio:0.5", "ratio:1.0"]


def measure(args, name, lens, prefix, link):
    cfg = engine.PrefillConfig(model=args.model, tp=args.tp, prompt_lens=lens, cached_prefix=prefix,
                               link=comm.parse_link(link), device="cpu", generate=0, warmup=args.warmup,
                               repeats=args.repeats, comm_backend=args.comm_backend)
    report = engine.run(cfg)
    cut = sum(len(r["chunks"]) > 1 for r in report.requests)
    return {"batch": name, "link": link, "requests": len(lens), "tokens": sum(lens), "prefix": prefix,
            "serial_ms": report.serial_ms, "iso_ms": report.iso_ms, "reduction": report.overlap.reduction,
            "efficiency": report.overlap.overlap_efficiency, "chunks": report.chunks, "cut_requests": cut,
            "agree": report.agree and report.iso_equals_serial_same_chunks, "report": report}


def table(results):
    header = ("| batch | link | requests | tokens | cached prefix | chunks (requests cut) | serial ms | iso ms "
              "| reduction | overlap eff. | logits |")
    lines = [header, "|---" * header.count(" |") + "|"]
    for r in results:
        lines.append(f"| {r['batch']} | {r['link']} | {r['requests']} | {r['tokens']} | {r['prefix']} "
                     f"| {r['chunks']} ({r['cut_requests']}) | {r['serial_ms']:.1f} | {r['iso_ms']:.1f} "
                     f"| {100 * r['reduction']:.1f}% | {r['efficiency']:.2f} "
                     f"| {'ISO == serial' if r['agree'] else 'DISAGREE'} |")
    return "\n".join(lines)


def rows(result, setup):
    config = {**setup, **{k: v for k, v in result.items() if k not in ("report", "serial_ms", "iso_ms")}}
    base = {"op": "iso_serving", "mode": result["link"], "x_name": "batch", "x_value": result["batch"]}
    return [{**base, "provider": provider, "metric": "ms", "unit": "ms", "p50": result[f"{provider}_ms"],
             "config_json": config} for provider in ("serial", "iso")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small batches on one link")
    parser.add_argument("--links", help=f"comma-separated links (default {','.join(LINKS)})")
    parser.add_argument("--model", default="llama-small")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--comm-backend", default="auto", choices=["auto", "torch", "nccl-ext"])
    parser.add_argument("--csv", type=Path, help="append rows here (default bench/results/iso_serving_cpu.csv)")
    args = parser.parse_args(argv)
    batches = QUICK_BATCHES if args.quick else BATCHES
    links = args.links.split(",") if args.links else LINKS[1:] if args.quick else LINKS
    setup = {"model": args.model, "tp": args.tp, "repeats": args.repeats, "cpu_count": os.cpu_count()}
    results = []
    for link in links:
        for name, (lens, prefix) in batches.items():
            results.append(measure(args, name, lens, prefix, link))
            common.append_rows(args.csv or common.RESULTS / "iso_serving_cpu.csv",
                               rows(results[-1], {**setup, "load_avg": os.getloadavg()[0]}))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(table(results))
    return 0 if all(r["agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
