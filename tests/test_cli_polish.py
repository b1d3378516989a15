"""The `munet` command's operator experience beyond tests/test_cli.py: usage mistakes and
impossible settings of `evolve`, `serve` and `predict` end with one `munet: error:` line
and a non-zero exit before anything starts; every command's --help ends with examples;
listings (`root list`, `evolve`) print a table by default and JSON with --json."""
from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading

import pytest
import torch

from munet import cli
from server_support import free_port
from test_cli import assert_one_error_line, run_main
from test_cli import installed as root_home  # noqa: F401 - the fixture: packaged root, no task


@pytest.mark.parametrize("args,fragment", [
    ([], "required: COMMAND"),
    (["evolve", "--bogus"], "unrecognized arguments: --bogus"),
    (["evolve", "--workers", "two"], "invalid int value: 'two'"),
    (["predict"], "predict: the following arguments are required: task, IMAGE"),
    (["task", "show"], "task show: the following arguments are required: name"),
    (["root", "frob"], "invalid choice: 'frob'"),
])
def test_usage_mistakes_print_one_line_that_points_to_help(monkeypatch, capsys, tmp_path, args, fragment):
    with pytest.raises(SystemExit) as exit_:
        run_main(monkeypatch, capsys, tmp_path, *args)
    err = capsys.readouterr().err
    assert_one_error_line(exit_.value.code, err, fragment, "--help`)")


def _leaf_commands(parser, out=None):
    out = [] if out is None else out
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict):
            for sub in action.choices.values():
                if any(hasattr(a, "choices") and isinstance(a.choices, dict) for a in sub._actions):
                    _leaf_commands(sub, out)
                else:
                    out.append(sub)
    return out


def test_every_command_help_ends_with_its_own_examples():
    parser = cli.build_parser()
    leaves = {p.prog: p for p in _leaf_commands(parser)}
    assert {"munet evolve", "munet serve", "munet predict", "munet root list", "munet task add"} <= set(leaves)
    for prog, sub in leaves.items():
        text = sub.format_help()
        assert "examples:\n" in text, f"`{prog} --help` shows no example"
        examples = text.split("examples:\n", 1)[1]
        commands = [line.strip() + " " for line in examples.splitlines() if line.startswith("  munet")]
        assert any(c.startswith(prog + " ") for c in commands), f"`{prog} --help` has no example of itself:\n{examples}"
    top = parser.format_help()
    for prog in leaves:
        assert f"  {prog}" in top, f"`munet --help` has no example of {prog}"


@pytest.mark.parametrize("args,fragment", [
    (["--workers", "0"], "--workers must be 1 or more"),
    (["--iterations", "0"], "--iterations must be 1 or more"),
    (["--max-epochs", "0"], "--max-epochs must be more than 0"),
    (["--image-size", "8"], "--image-size must be between 16 and 1024"),
    (["--base", "1.5"], "--base must be in (0, 1]"),
    (["--lease-ttl", "1"], "--lease-ttl must be at least 3 seconds"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--metrics-port", "70000"], "--metrics-port must be between 1 and 65535"),
    (["--task", "nosuch"], "no task named 'nosuch'"),
])
def test_evolve_rejects_impossible_settings_with_one_line(root_home, monkeypatch, capsys, args, fragment):
    rc, out, err = run_main(monkeypatch, capsys, root_home, "evolve", *args)
    assert_one_error_line(rc, err, fragment)
    assert out == ""


def test_evolve_on_a_machine_without_cuda_says_so(root_home, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, _, err = run_main(monkeypatch, capsys, root_home, "evolve", "--device", "cuda")
    assert_one_error_line(rc, err, "no CUDA device")


@contextlib.contextmanager
def listening_socket():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock


def test_serve_and_evolve_metrics_on_a_taken_port_fail_with_one_line(root_home, monkeypatch, capsys):
    with listening_socket() as sock:
        port = sock.getsockname()[1]
        rc, _, err = run_main(monkeypatch, capsys, root_home, "serve", "--host", "127.0.0.1", "--port", str(port))
        assert_one_error_line(rc, err, f"cannot listen on 127.0.0.1:{port}", "choose another --port")
        rc, _, err = run_main(monkeypatch, capsys, root_home, "evolve", "--metrics-port", str(port))
        assert_one_error_line(rc, err, "choose another --metrics-port")
    rc, _, err = run_main(monkeypatch, capsys, root_home, "serve", "--host", "no-such-host.invalid")
    assert_one_error_line(rc, err, "not a known address")


def test_evolve_without_tasks_reports_no_visits_as_text_and_json(root_home, monkeypatch, capsys):
    rc, out, err = run_main(monkeypatch, capsys, root_home, "evolve")
    assert rc == 0 and "no visits" in out, (out, err)
    rc, out, _ = run_main(monkeypatch, capsys, root_home, "evolve", "--json")
    assert rc == 0 and json.loads(out) == []


def test_evolve_settings_override_the_preset_and_max_epochs_sets_every_visits_length(monkeypatch):
    from munet.evolver import cli as evolver_cli
    from munet.evolver.config import cpu_preset

    # A preset that lengthens later visits: --max-epochs asks for one length, so it must win on every visit.
    monkeypatch.setitem(evolver_cli.PRESETS, "cpu", lambda: cpu_preset().replace(visit_epochs=(0.25, 1.75)))
    parse = cli.build_parser().parse_args
    preset = evolver_cli.config_from_args(parse(["evolve", "--preset", "cpu"]))
    assert [preset.for_visit(n).max_epochs for n in range(3)] == [0.25, 1.75, 1.75]
    cfg = evolver_cli.config_from_args(parse(["evolve", "--preset", "cpu", "--max-epochs", "1.5", "--generations", "2",
                                              "--image-size", "48", "--base", "0.7"]))
    assert [cfg.for_visit(n).max_epochs for n in range(3)] == [1.5, 1.5, 1.5]
    assert (cfg.generations, cfg.defaults["image_size"], cfg.base) == (2, 48, 0.7)
    assert cpu_preset().defaults["image_size"] == 64  # the override changed this run's settings only


def test_evolve_summary_table_shows_each_visit_and_failures(capsys):
    from munet.evolver.cli import print_summaries

    ctx = cli.Context(args=None)
    print_summaries(ctx, [
        {"task": "digits", "candidates": 6, "improved": 2, "seconds": 41.2, "score": 0.9312, "val_acc": 0.9312,
         "test_acc": 0.91, "accounted_params": 12800.0, "moved": True, "error": None},
        {"task": "broken", "error": "ValueError: bad data"},
    ])
    out = capsys.readouterr().out
    digits = next(line for line in out.splitlines() if "digits" in line)
    for cell in ("6", "2", "41", "0.9312", "0.9100", "12.8k", "new"):
        assert cell in digits, digits
    assert "FAILED: ValueError: bad data" in out


def test_root_list_prints_a_table_and_the_same_roots_as_json(root_home, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, root_home, "root", "list")
    assert rc == 0
    line = next(line for line in out.splitlines() if line.strip().startswith("lite0"))
    assert "tf_efficientnet_lite0" in line and "packaged" in line and "4.65M" in line and "3.37M" in line
    rc, out, _ = run_main(monkeypatch, capsys, root_home, "root", "list", "--json")
    roots = json.loads(out)
    assert rc == 0 and [r["name"] for r in roots] == ["lite0"]
    assert roots[0]["params"] == 4_652_008 and roots[0]["tasks"] == 0


class _Silent(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's naming
        if self.server.mode == "html":
            body = b"<html>not munet</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:  # never answers within the client's timeout
            self.server.release.wait(10)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def fake_server(mode: str):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    server.mode, server.release = mode, threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


def test_predict_failures_are_one_line_each(tmp_path, monkeypatch, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG not really")
    cases = [
        ([str(tmp_path / "missing.png")], "no such image file"),
        ([str(image), "--top", "0"], "--top must be 1 or more"),
        ([str(image), "--url", f"http://127.0.0.1:{free_port()}"], "no munet server at"),
    ]
    for extra, fragment in cases:
        rc, _, err = run_main(monkeypatch, capsys, tmp_path, "predict", "digits", *extra)
        assert_one_error_line(rc, err, fragment)
    with fake_server("html") as url:
        rc, _, err = run_main(monkeypatch, capsys, tmp_path, "predict", "digits", str(image), "--url", url)
        assert_one_error_line(rc, err, "not as a munet server")
    with fake_server("silent") as url:
        rc, _, err = run_main(monkeypatch, capsys, tmp_path, "predict", "digits", str(image), "--url", url,
                              "--timeout", "1")
        assert_one_error_line(rc, err, "did not answer within 1s")
