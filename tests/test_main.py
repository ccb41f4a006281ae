"""`python -m fusedres`'s environment report (fusedres/__main__.py)."""
import fusedres.__main__ as main


def _copies_line(capsys):
    main.environment()
    return next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("MXNet copies:"))


def test_reports_mxnets_copy_setting_and_why_to_set_it(monkeypatch, capsys):
    monkeypatch.delenv("MXNET_CPU_PARALLEL_SIZE", raising=False)
    line = _copies_line(capsys)
    assert "unset (MXNet: 200000)" in line and "set it to 2000000000 before MXNet loads" in line
    monkeypatch.setenv("MXNET_CPU_PARALLEL_SIZE", "2000000000")
    assert _copies_line(capsys) == "MXNet copies:    MXNET_CPU_PARALLEL_SIZE=2000000000"
