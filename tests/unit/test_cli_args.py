"""The CLI's arguments: ``--run`` expands ``$VARS`` where the command runs (a job: on the cluster)."""

from __future__ import annotations

import pytest

from adrec.cli import build_parser


def test_run_expands_the_store_named_on_the_nodes(monkeypatch):
    monkeypatch.setenv("ADREC_STORE", "s3://bucket-x/adrec")
    for typed in ("$ADREC_STORE/runs/r1", "${ADREC_STORE}/runs/r1"):
        assert build_parser().parse_args(["train", "--run", typed]).run == "s3://bucket-x/adrec/runs/r1"
    assert build_parser().parse_args(["train", "--run", "runs/r1"]).run == "runs/r1"
    parsed = build_parser().parse_args(["prepare", "--run", "r", "--data-dir", "$ADREC_STORE/data/ml-100k"])
    assert parsed.data_dir == "s3://bucket-x/adrec/data/ml-100k"


def test_an_unset_variable_is_an_error_not_a_folder_named_after_it(monkeypatch, capsys):
    monkeypatch.delenv("ADREC_STORE", raising=False)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prepare", "--run", "$ADREC_STORE/runs/r1"])
    assert "names $ADREC_STORE, which is not set here" in capsys.readouterr().err
