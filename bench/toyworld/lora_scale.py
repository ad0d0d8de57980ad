"""One LoRA scale for every sampling mode: a single concept at Mix-of-Show's suggested 0.7 against 1.0.

Fused models and isolated branches apply every LoRA at full strength; this measures whether one
concept alone should differ. Each pet, stock (rex, bolt, mimi) and the random pets of
`layout_eval` (seed 12), is sampled as "a <pet> on the beach" at both scales, same seeds.

    python -m bench.toyworld.lora_scale --work DIR --samples 32 [--device cpu]

Pets are trained into DIR/train/today/<pet>/ as `layout_eval` does (recipe "today"; a pet already
there is reused, so `layout_eval`'s work folder can be given); the table goes to DIR/lora_scale.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.toyworld.evaluate import identity_rate, load_world
from bench.toyworld.layout_eval import single_pet_sample
from bench.toyworld.world import PETS_BY_NAME
from pipelines.concept import ConceptLibrary

SCALES = (0.7, 1.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder of trained pets (train/today/<pet>/) and of the result")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    work = Path(args.work)
    pets = single_pet_sample(work, args.device)
    results = {"samples": args.samples, "scales": SCALES, "pets": {}}
    base, oracle = load_world(args.device)
    for pet in pets:
        library = ConceptLibrary(work / "train" / "today" / pet.name)
        rates = {str(scale): identity_rate(base, library, oracle, f"a <{pet.name}> on the beach", pet.look, args.samples,
                                           lora_scale=scale) for scale in SCALES}
        results["pets"][pet.name] = {"random": pet.name not in PETS_BY_NAME, **rates}
        print(pet.name, json.dumps(rates), flush=True)
    for group, random in (("stock", False), ("random", True)):
        rows = [r for r in results["pets"].values() if r["random"] == random]
        results[f"mean_{group}"] = {str(s): {k: round(sum(r[str(s)][k] for r in rows) / len(rows), 3)
                                             for k in ("identity", "match", "belly")} for s in SCALES}
    (work / "lora_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k.startswith("mean")}, indent=1))
    return results


if __name__ == "__main__":
    main()
