"""The parity errors of the base stage's models and samplers against their references, as measured
by the tests themselves (no second copy of the comparisons).

    python bench/parity_report.py [--out docs/parity.md]    # from the repository root

Runs the parity tests of tests/test_dit.py, test_vae.py, test_text_encoder.py, test_flows.py and
test_wan_pipeline_parity.py under pytest with a JUnit XML report; each of those tests records what it measured with pytest's
`record_property` (the largest |ours − reference| / max |reference|, or the measured convergence
orders). This script reads the properties back and writes them as a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cascade.outputs import write_atomic  # noqa: E402

# (what is compared, reference, pytest node selection, the test's tolerance)
PARITY_TESTS = [
    ("DiT, diffusers layout", "diffusers WanTransformer3DModel",
     "tests/test_dit.py::test_loads_diffusers_layout_with_parity", "1e-5 relative"),
    ("DiT, official layout (1 file, 2 shards)", "diffusers WanTransformer3DModel",
     "tests/test_dit.py::test_loads_official_layout_with_parity", "1e-5 relative"),
    ("VAE encode / decode", "diffusers AutoencoderKLWan",
     "tests/test_vae.py::test_diffusers_folder_matches_diffusers "
     "tests/test_vae.py::test_official_pth_matches_diffusers", "1e-4 relative"),
    ("UMT5/T5 text encoder", "transformers encoder the weights came from",
     "tests/test_text_encoder.py::test_official_folder_matches_transformers "
     "tests/test_text_encoder.py::test_official_pth_file_with_byte_tokenizer "
     "tests/test_text_encoder.py::test_diffusers_folder_matches_transformers", "1e-5 (bf16 run: 5e-2)"),
    ("sampler trajectories", "diffusers flow-matching schedulers",
     "tests/test_flows.py::test_trajectory_matches_diffusers_scheduler "
     "tests/test_flows.py::test_unipc_matches_diffusers_on_the_wan_schedule", "1e-5 relative"),
    ("base stage, final latents (same weights, embeddings, noise, schedule)", "diffusers WanPipeline",
     "tests/test_wan_pipeline_parity.py::test_base_stage_matches_wan_pipeline", "1e-4 relative"),
    ("base stage with UniPC fed float 1000·σ (negative control)", "diffusers WanPipeline",
     "tests/test_wan_pipeline_parity.py::test_float_timesteps_would_miss_the_pipeline", "must exceed 1e-3"),
    ("convergence order (Gaussian mixture, N = 32 → 64 → 128)", "closed-form velocity, RK4 solution",
     "tests/test_flows.py::test_convergence_order_away_from_data "
     "tests/test_flows.py::test_convergence_order_of_the_full_schedule", "Euler ≥ 0.9, multistep ≥ 1.5–1.8"),
]


def measured_properties(selections: list[str]) -> dict[str, tuple[str, dict[str, str]]]:
    """test id -> (outcome, {property: value}) from one pytest run over `selections`."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        nodes = [node for selection in selections for node in selection.split()]
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        *nodes], cwd=REPO_ROOT, check=False)
        tree = ElementTree.parse(report)
    results = {}
    for case in tree.iter("testcase"):
        outcome = "failed" if case.find("failure") is not None or case.find("error") is not None else "passed"
        if case.find("skipped") is not None:
            outcome = "skipped"
        properties = {item.get("name"): item.get("value") for item in case.iter("property")}
        results[f"{case.get('classname')}::{case.get('name')}"] = (outcome, properties)
    return results


def format_value(value: str) -> str:
    try:
        return f"{float(value):.1e}"
    except ValueError:
        return value  # the orders, already formatted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "parity.md")
    arguments = parser.parse_args()
    results = measured_properties([selection for _, _, selection, _ in PARITY_TESTS])
    lines = [
        "# Parity of the base stage with its references",
        "",
        "Written by `python bench/parity_report.py` from what the tests measured (pytest's "
        "`record_property`); float32 on the CPU unless the case says otherwise. Error: the largest "
        "|ours − reference| / max |reference| of the compared outputs.",
        "",
        "| compared | reference | case | measured | tolerance | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for what, reference, selection, tolerance in PARITY_TESTS:
        modules_and_names = [node.replace(".py::", "::").replace("/", ".") for node in selection.split()]
        for test_id, (outcome, properties) in results.items():
            if not any(test_id.startswith(prefix) for prefix in modules_and_names):
                continue
            case = test_id.split("[", 1)[1].rstrip("]") if "[" in test_id else test_id.rsplit("::", 1)[1]
            measured = ", ".join(f"{name.replace('_relative_error', '').replace('relative_error', 'error')} "
                                 f"{format_value(value)}" for name, value in properties.items())
            lines.append(f"| {what} | {reference} | {case} | {measured} | {tolerance} | {outcome} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(arguments.out, text.encode())
    return 0 if all(outcome == "passed" for outcome, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
