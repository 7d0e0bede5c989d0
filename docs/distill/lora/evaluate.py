import json
import sys
sys.path.insert(0, "/work/main")
from xslim_lab import distill_evaluate as E
rows = [("Stage I 2-step, full copies (lr 4e-5 / 3.2e-4)", "full", None, None),
        ("Stage I 2-step, LoRA r64 (lr 4e-4 / 3.2e-3)", "lora64", None, None),
        ("Stage I 2-step, LoRA r16 (lr 4e-4 / 3.2e-3)", "lora16", None, None)]
result = E.evaluate(runs="/work/runs/lora_cmp", student_rows=rows, cache_dir=E.default_cache_dir(None))
out = []
for r in result["rows"]:
    m = r["metrics"]
    out.append({"name": r["name"], "nfe": r["nfe"], **{k: [round(v["mean"], 4), round(v["se"], 4), [round(x, 4) for x in v["sets"]]] for k, v in m.items()}})
json.dump(out, open("/work/runs/lora_cmp/results.json", "w"), indent=1)
for o in out:
    print(o["name"], o["nfe"], {k: o[k][:2] for k in ("fd", "accuracy", "diversity", "recall") if k in o})
print("seconds", result["seconds"])
