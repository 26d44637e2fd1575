import subprocess
import sys


def test_wheel_ships_configs_and_split_lists(tmp_path):
    """`pip install dist/*.whl` must be enough: configs and split lists live inside the wheel."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            ".",
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("metarun-*.whl"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    splits = target / "metarun" / "splits"
    assert (splits / "omniglot-vinyals" / "test.txt").read_text().count("\n") == 1692
    assert (splits / "miniimagenet-ravi" / "train.csv").read_text().count("\n") == 1 + 64 * 600
    assert [
        len((splits / "cifar-fs" / f"{part}.txt").read_text().split())
        for part in ("train", "val", "test")
    ] == [64, 16, 20]
    assert len((splits / "fc100" / "train.txt").read_text().split()) == 12
    assert (target / "metarun" / "conf" / "augment" / "standard.yaml").is_file()
    assert (target / "metarun" / "conf" / "dataset" / "miniimagenet.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import metarun, sys; assert metarun.__file__.startswith(sys.argv[1]); "
            "from metarun.commands.train import main; sys.argv[1:] = ['+experiment=protonet_omniglot_5w1s', 'optimizer=sgd', '--cfg', 'job']; main()",
            str(target),
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    assert (
        "_target_: metarun.algorithms.protonet.ProtoNet" in result.stdout
        and "_target_: torch.optim.SGD" in result.stdout
    )
    assert "n_way: 20" in result.stdout
    assert (
        "metarun-data = metarun.commands.data:main"
        in next(target.glob("metarun-*.dist-info/entry_points.txt")).read_text()
    )
