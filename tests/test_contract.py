"""The contract between the two packages: what the service serves for a window (ONNX Runtime, through HTTP)
equals what training computes in PyTorch for the same action sequence, from the same artifact."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app.manifest import read_manifest
from tests.app_client import probabilities, running_app

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _real_sequences(path: Path, column: str, users: int) -> list[list[str]]:
    """The first `users` users' action sequences from a sample log, in file order (the log is time-sorted)."""
    seqs: dict[str, list[str]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["user_id"] in seqs or len(seqs) < users:
                seqs.setdefault(row["user_id"], []).append(row[column])
    return list(seqs.values())


@pytest.mark.parametrize(
    ("artifact_fixture", "data", "column"),
    [
        ("behavior_artifact", "taobao_sample.csv", "behavior"),
        ("item_artifact", "beauty_sample.csv", "item_id"),
    ],
)
async def test_served_probabilities_equal_trainings(
    request: pytest.FixtureRequest, redis_url: str, artifact_fixture: str, data: str, column: str
) -> None:
    from training.predict import predict as torch_predict  # training imports torch: only here

    artifact: Path = request.getfixturevalue(artifact_fixture)
    manifest = read_manifest(artifact)
    window = manifest.window
    real = _real_sequences(EXAMPLES / data, column, users=4)
    sequences = [
        [],
        real[0][:1],
        real[1][: window // 2],
        real[2][: 2 * window] + ["never-seen-action"],
        real[3],
    ]
    expected = torch_predict(artifact, sequences)  # (B, V) from PyTorch
    assert expected.shape == (len(sequences), manifest.vocab_size)

    async with running_app(artifact, redis_url, window_size=3 * window) as (_, client):
        for n, seq in enumerate(sequences):
            user = f"contract-{n}"
            if seq:
                events = [{"action": a, "timestamp": t} for t, a in enumerate(seq)]
                for start in range(0, len(events), 500):
                    r = await client.post(
                        f"/v1/users/{user}/events", json={"events": events[start : start + 500]}
                    )
                    assert r.status_code == 200, r.text
            served = await client.get(f"/v1/users/{user}/predictions", params={"k": manifest.vocab_size})
            assert served.status_code == 200, served.text
            got = probabilities(served.json())
            want = {
                a: float(p)
                for a, p in zip(manifest.vocabulary, expected[n], strict=True)
                if a not in ("<pad>", "<unk>")
            }
            assert got.keys() == want.keys()
            actions = sorted(want)
            np.testing.assert_allclose(
                [got[a] for a in actions], [want[a] for a in actions], atol=1e-5, rtol=1e-4
            )
