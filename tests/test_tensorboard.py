"""TensorBoard scalars from the engine (tensorboardX) read back with tensorboard's own event
reader: the same event files and tags TensorBoard shows."""
import pytest

pytest.importorskip("tensorboardX")
loader = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")


def test_scalars_read_back_with_tensorboards_reader(tmp_path):
    from hvdscale.engine.tensorboard import open_writer
    writer = open_writer(tmp_path / "tensorboard")
    writer.scalar("test_accuracy", 0.75, 12)
    writer.scalar("train_loss", 1.5, 12)
    writer.scalar("test_accuracy", 0.8125, 24)
    # flushed per scalar: readable before close, as after a crash
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert files == [writer.path]
    events = list(loader.EventFileLoader(str(writer.path)).Load())
    writer.close()
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value)
               for e in events[1:] for v in e.summary.value]
    assert scalars == [(12, "test_accuracy", 0.75), (12, "train_loss", 1.5),
                       (24, "test_accuracy", 0.8125)]


def test_writer_loads_no_framework(tmp_path):
    """A TensorFlow worker must not pay for torch (tensorboardX would import it) nor any
    worker for TensorFlow."""
    import subprocess
    import sys
    code = ("import sys; from hvdscale.engine.tensorboard import open_writer; "
            "open_writer(sys.argv[1]).scalar('x', 1.0, 1); "
            "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
