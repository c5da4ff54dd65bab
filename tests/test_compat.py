"""The package runs on older torch releases than the one CI installs: GPU images here carry torch 2.11. Names that
exist only in newer releases fail there at the first call, far from CI, so they are refused here by name."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_nf4"
NEWER_THAN_2_11 = {  # name: what works on 2.11 too
    "reduce_scatter_single(": "dist.reduce_scatter_tensor(output, input, group=...)",
    "all_gather_single(": "dist.all_gather_into_tensor(output, input, group=...)",
}


def test_package_uses_no_collectives_newer_than_torch_2_11():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {name} -> use {instead}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for name, instead in NEWER_THAN_2_11.items()
        if name in line and not line.lstrip().startswith("#")
    ]
    assert not found, "\n".join(found)
