import subprocess
import sys


def test_wheel_ships_configs_and_split_lists(tmp_path):
    """`pip install dist/*.whl` must be enough: configs and split lists live inside the wheel."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), "."],
        check=True, capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("metarun-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    assert (target / "metarun" / "splits" / "omniglot-vinyals" / "test.txt").read_text().count("\n") == 1692
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", "import metarun, sys; assert metarun.__file__.startswith(sys.argv[1]); "
         "from metarun.cli import main; sys.argv[1:] = ['+experiment=protonet_omniglot_5w1s', 'optimizer=sgd', '--cfg', 'job']; main()",
         str(target)],
        cwd=elsewhere, capture_output=True, text=True, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert "_target_: metarun.algorithms.protonet.ProtoNet" in result.stdout and "_target_: torch.optim.SGD" in result.stdout
    assert "n_way: 20" in result.stdout
