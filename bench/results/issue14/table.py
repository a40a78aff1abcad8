"""Markdown table of the issue-14 runs in the given JSON-lines files (bench.train --runs-file)."""
import json
import sys
from collections import defaultdict

rows = defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        r = rec["run"]
        c = r["config"]
        name = r["strategy"]
        opts = []
        if c.get("proposal_temperature") is not None:
            opts.append(f"T'={c['proposal_temperature']}")
        if c.get("correction", "logq") != "logq":
            opts.append(f"correction={c['correction']}")
        if not c["in_batch_negatives"]:
            opts.append("no in-batch")
        if c["k"] != 32 and name != "inbatch":
            opts.append(f"k={c['k']}")
        if name.startswith("treeidx") and c.get("landmark_refresh_every", 1) > 10**5:
            opts.append("stale index (no drift refits, no full refresh)")
        if name.startswith("treeidx") and c.get("treeidx_proposal_temperature") is not None:
            opts.append(f"T'={c['treeidx_proposal_temperature']}")
        if c.get("false_negative_margin") is not None:
            opts.append(f"fn-margin={c['false_negative_margin']}")
        key = (rec["data"]["n_targets"], c["steps"], name + (" " + ", ".join(opts) if opts else ""))
        rows[key].append(r)
print("| targets | steps | run | seeds | recall@1 | recall@10 | MRR | final loss | neg: exact dup | cos>0.95 | above pos | mean cos to pos | s/step |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (n, steps, name), rs in sorted(rows.items()):
    def m(f):
        import numpy as np
        v = np.array([f(r) for r in rs], float)
        return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")
    st = rs[0]["sampler_stats"]
    fn = lambda k: f"{st[k]:.4f}" if k in st else "—"
    print(f"| {n:,} | {steps} | {name} | {','.join(str(r['config']['seed']) for r in rs)} | {m(lambda r: r['test']['recall@1'])} | "
          f"{m(lambda r: r['test']['recall@10'])} | {m(lambda r: r['test']['mrr'])} | {m(lambda r: r['final_loss'])} | "
          f"{fn('neg_exact_dup_rate')} | {fn('neg_near_dup_rate')} | {fn('neg_above_pos_rate')} | {fn('neg_mean_cos_to_pos')} | "
          f"{m(lambda r: r['train_s'] / r['steps'])} |")
