"""Every verb, given a missing file, a folder for a file, a model of the wrong kind or a number
out of range, prints exactly one line, exits non-zero and writes nothing; RPC verbs aimed at
a port nobody listens on, or that never answers, fail within their timeout."""
import socket
import time

import pytest

from ripple.android_host.cli import main


@pytest.fixture
def place(tmp_path):
    """tmp_path with: a folder, a text file, a Hugging Face folder of an unsupported kind,
    and an empty out/ to check that nothing is written."""
    (tmp_path / "adir").mkdir()
    (tmp_path / "notes.txt").write_text("not a model\n")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "out").mkdir()
    return tmp_path


def run(capsys, place, line: str):
    argv = [a.replace("T/", f"{place}/") for a in line.split()]
    capsys.readouterr()
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    seconds = time.perf_counter() - t0
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    return code, err, seconds


def _nothing_written(place):
    assert [p for p in (place / "out").rglob("*") if p.is_file()] == []


MISSING = [
    ("profile --model T/nope.gguf --out T/out/p.npz", "nope.gguf: no such"),
    ("profile --out T/out/p.npz --text T/missing.txt", "missing.txt: no such file"),
    ("probe storage --rpc 127.0.0.1:9 --compare-local --path T/nope --out T/out/p.json", "nope: no such folder"),
    ("train-predictor --profile T/nope.npz --out T/out/pred.npz", "nope.npz: no such file"),
    ("pack --model T/nope.gguf --out T/out/lay", "nope.gguf: no such"),
    ("pack --out T/out/lay --profile T/nope.npz", "nope.npz: no such file"),
    ("pack --out T/out/lay --placement T/nope.npz", "nope.npz: no such file"),
    ("place --profile T/nope.npz --out T/out/pl.npz", "nope.npz: no such file"),
    ("inspect T/nope", "nope: no such file; run `ripple pack`"),
    ("generate --layout T/nope", "run `ripple pack`"),
    ("generate --layout T/adir --predictor T/nope.npz", "nope.npz: no such file"),
    ("tune kernels --model T/nope.gguf", "nope.gguf: no such"),
    ("export --target host --layout T/nope --out T/out/exp", "ripple pack"),
    ("bench io --profile T/nope.npz --json T/out/b.json", "nope.npz: no such file"),
    ("bench kernels --model T/nope.gguf --json T/out/b.json", "nope.gguf: no such"),
    ("bench placement --profile T/nope.npz --json T/out/b.json", "nope.npz: no such file"),
    ("bench predictor --profile T/nope.npz --json T/out/b.json", "nope.npz: no such file"),
    ("sparsify --model T/nope.gguf --out T/out/sp", "nope.gguf: no such"),
    ("sparsify --out T/out/sp --text T/missing.txt", "missing.txt: no such file"),
]

FOLDER_FOR_A_FILE = [
    ("profile --out T/adir", "adir is a folder"),
    ("profile --out T/out/p.npz --text T/adir", "adir is a folder, not a file"),
    ("profile --out T/out/p.npz --json T/adir", "adir is a folder"),
    ("train-predictor --profile T/adir --out T/out/pred.npz", "adir is a folder, not a file"),
    ("pack --out T/out/lay --profile T/adir", "adir is a folder, not a file"),
    ("place --profile T/adir --out T/out/pl.npz", "adir is a folder, not a file"),
    ("place --profile T/notes.txt --out T/adir", "adir is a folder"),
    ("bench io --json T/adir", "adir is a folder"),
    ("bench predictor --profile T/adir --json T/out/b.json", "adir is a folder, not a file"),
    # and the other way round: a file where a folder must be
    ("pack --out T/notes.txt", "notes.txt is a file; give a folder"),
    ("sparsify --out T/notes.txt", "notes.txt exists; pass a new --out"),
    ("sparsify --out T/adir", "adir exists; pass a new --out"),
    ("export --target host --layout T/adir --out T/notes.txt", "notes.txt is a file; give a folder"),
    ("profile --out T/notes.txt/p.npz", "notes.txt is a file, not a folder"),
    ("inspect T/notes.txt", "manifest.json: no manifest; run `ripple pack`"),
    ("generate --layout T/adir", "model.rflash: no such file; run `ripple pack`"),
    ("probe storage --path T/notes.txt --quick --no-fio", "notes.txt"),
]

WRONG_KIND = [
    ("profile --model T/notes.txt --out T/out/p.npz", "expected a .gguf file or a Hugging Face"),
    ("profile --model T/gpt2 --out T/out/p.npz", "model_type 'gpt2' is not supported"),
    ("profile --model T/adir --out T/out/p.npz", "config.json is missing"),
    ("pack --model T/gpt2 --out T/out/lay", "model_type 'gpt2' is not supported"),
    ("pack --out T/out/lay --profile T/notes.txt", "notes.txt"),
    ("pack --out T/out/lay --placement T/notes.txt", "unreadable placement"),
    ("place --profile T/notes.txt --out T/out/pl.npz", "notes.txt"),
    ("train-predictor --profile T/notes.txt --out T/out/pred.npz", "notes.txt"),
    ("tune kernels --model T/gpt2", "model_type 'gpt2' is not supported"),
    ("sparsify --model T/gpt2 --out T/out/sp", "model_type 'gpt2' is not supported"),
    ("export --target nosuch --layout T/adir --out T/out/exp", "nosuch"),
]

BAD_NUMBERS = [
    ("profile --out T/out/p.npz --sparsity 1.5", "--sparsity: 1.5 is outside [0, 1)"),
    ("profile --out T/out/p.npz --sparsity nan", "--sparsity: 'nan' is not a finite number"),
    ("profile --out T/out/p.npz --ppl-budget -1", "--ppl-budget: -1.0 must not be negative"),
    ("profile --out T/out/p.npz --ppl-budget inf", "not a finite number"),
    ("profile --out T/out/p.npz --calib-tokens -5", "--calib-tokens: -5 must be at least 1"),
    ("train-predictor --profile T/notes.txt --out T/out/p.npz --recall 1.5", "outside (0, 1]"),
    ("train-predictor --profile T/notes.txt --out T/out/p.npz --rank -3", "must be at least 1"),
    ("place --profile T/notes.txt --out T/out/pl.npz --k -1", "--k: -1 must be at least 1"),
    ("generate --layout T/adir --sparsity 1.5", "outside [0, 1)"),
    ("generate --layout T/adir --tokens -1", "must be at least 1"),
    ("generate --layout T/adir --queue-depth 0", "must be at least 1"),
    ("tune kernels --trials 0", "--trials: 0 must be at least 1"),
    ("probe storage --rpc 127.0.0.1:9 --rpc-timeout -1", "--rpc-timeout: -1.0 must be above 0"),
    ("bench io --budget -1 --json T/out/b.json", "--budget: -1.0 is outside [0, 1]"),
    ("bench io --budget 1.5 --json T/out/b.json", "--budget: 1.5 is outside [0, 1]"),
    ("bench io --sparsity 1.5 --json T/out/b.json", "--sparsity: 1.5 is outside [0, 1)"),
    ("bench io --tokens -3 --json T/out/b.json", "--tokens: -3 must be at least 1"),
    ("bench io --queue-depth 0 --json T/out/b.json", "--queue-depth: 0 must be at least 1"),
    ("bench kernels --fractions 0.5 1.5 --json T/out/b.json", "--fractions: 1.5 is outside (0, 1]"),
    ("bench kernels --repeat 0 --json T/out/b.json", "--repeat: 0 must be at least 1"),
    ("bench placement --k -1 --json T/out/b.json", "--k: -1 must be at least 1"),
    ("bench predictor --profile T/notes.txt --sparsities 1.5 --json T/out/b.json", "--sparsities: 1.5"),
    ("bench predictor --profile T/notes.txt --recall 0 --json T/out/b.json", "--recall: 0.0 is outside"),
    ("sparsify --out T/out/sp --target-sparsity 1.5", "--target-sparsity: 1.5 is outside [0, 1)"),
    ("sparsify --out T/out/sp --minutes 0", "--minutes: 0.0 must be above 0"),
    ("sparsify --out T/out/sp --lr -1", "--lr: -1.0 must be above 0"),
]


@pytest.mark.parametrize("line, says", MISSING + FOLDER_FOR_A_FILE + WRONG_KIND + BAD_NUMBERS,
                         ids=[c[0] for c in MISSING + FOLDER_FOR_A_FILE + WRONG_KIND + BAD_NUMBERS])
def test_bad_input_gives_one_line_a_non_zero_exit_and_no_output(capsys, place, line, says):
    code, err, _ = run(capsys, place, line)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("ripple: error: ") and says in err[0], err[0]
    _nothing_written(place)


@pytest.mark.parametrize("line", [l for l, _ in MISSING + FOLDER_FOR_A_FILE + BAD_NUMBERS
                                  if "--model" not in l and "--layout" not in l and "inspect" not in l
                                  and "export" not in l and "probe" not in l])
def test_bad_paths_and_numbers_fail_before_the_verb_starts(capsys, place, line):
    """A typo costs nothing: these never reach the verb (which loads models, profiles...)."""
    from ripple.android_host import cli
    argv = [a.replace("T/", f"{place}/") for a in line.split()]
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:            # numbers: the parser's own check
        assert e.code == 2
        return
    args.run = lambda a: pytest.fail("the verb ran")
    assert cli.run(args) == 2          # paths: checked before the verb is called


# --- RPC: nothing hangs -------------------------------------------------------------------------------

@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]       # closed again when the with block ends


@pytest.fixture
def silent_port():
    """Accepts connections and never says a word: a hung server or tracker."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s.getsockname()[1]
    s.close()


@pytest.mark.parametrize("line, says", [
    ("probe storage --rpc 127.0.0.1:{closed} --quick", "127.0.0.1:{closed}"),
    ("probe storage --tracker 127.0.0.1:{closed} --key phone --quick", "cannot connect"),
    ("probe storage --tracker 127.0.0.1:{closed} --quick", "also give --key"),
    ("devices --tracker 127.0.0.1:{closed}", "cannot connect"),
    ("bench kernels --rpc 127.0.0.1:{closed} --json T/out/b.json", "127.0.0.1:{closed}"),
    ("probe storage --rpc 127.0.0.1:{silent} --quick --rpc-timeout 2", "127.0.0.1:{silent}"),
    ("probe storage --tracker 127.0.0.1:{silent} --key phone --quick --rpc-timeout 2", "127.0.0.1:{silent}"),
], ids=["rpc-closed", "tracker-closed", "tracker-no-key", "devices-closed", "bench-kernels-closed",
        "rpc-silent", "tracker-silent"])
def test_rpc_to_nobody_fails_in_one_line_within_the_timeout(capsys, place, closed_port, silent_port, line, says):
    fill = dict(closed=closed_port, silent=silent_port)
    code, err, seconds = run(capsys, place, line.format(**fill))
    assert code == 2 and len(err) == 1 and says.format(**fill) in err[0], err
    assert seconds < 30, seconds       # 2 s timeouts; the rest is imports on a busy machine
    _nothing_written(place)
