"""Runs a pipeline module with a fault planted in it, for tests/test_faults.py.

    FAULT='{"kill_at_step": 9, "worker": 1}' python -m tests.fault_injection pipelines.cifar10_cnn --smoke ...

The fault is given as JSON in the FAULT environment variable, so that `strategies.launch_local`
hands the same one to every worker and each worker decides from its TF_CONFIG index whether it
is the one to fail:

    {"kill_at_step": N, "worker": W}   SIGKILL worker W (default 0) at a random moment inside the
                                       train step after global step N: a preempted machine.
    {"kill_in_save": WHERE, "call": K} SIGKILL this process inside its K-th checkpoint save
                                       (counting every save: backup, latest, best). WHERE is
                                       "after_data": the new data is written under a temporary
                                       name, not yet merged into the checkpoint's files;
                                       "inside_merge": inside TF's merge, as it leaves it after
                                       moving the new data file to its final name and before it
                                       writes the index (one C++ op, so its first half is done
                                       here, as MergeV2Checkpoints does it);
                                       "before_pointer": the new checkpoint's files are whole but
                                       the `checkpoint` pointer file still names the old one.

    {"fill_disk_after_epoch": N, "path": DIR}
                                       right after epoch N's history row, fill the file system
                                       holding DIR (a small tmpfs in the test) to the last byte,
                                       so that epoch N's checkpoint saves meet a full disk.

The kill is a real SIGKILL from the process to itself: nothing gets to clean up, as on a
preempted host. Only the timing is planted, so that a test can aim at a window that a kill
from outside would hit by chance.
"""

import json
import os
import random
import runpy
import signal
import sys
import threading


def _worker_index():
    return int(json.loads(os.environ.get("TF_CONFIG") or '{"task": {"index": 0}}')["task"]["index"])


def _kill_now():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at_step(step, seed):
    import tf_keras as keras

    original = keras.callbacks.CallbackList.on_train_batch_end
    fired = []

    def on_train_batch_end(self, batch, logs=None):
        original(self, batch, logs)
        if not fired and int(self.model.optimizer.iterations.numpy()) >= step:
            fired.append(step)
            print(f"fault_injection: killing worker {_worker_index()} after step {step}", flush=True)
            # A few milliseconds later: inside the next step, not on a step boundary.
            threading.Timer(random.Random(seed).uniform(0.0, 0.05), _kill_now).start()

    keras.callbacks.CallbackList.on_train_batch_end = on_train_batch_end


def _text(tensor_or_text):
    """A path given to a TF op, as a str (eager ops get string tensors)."""
    value = tensor_or_text.numpy() if hasattr(tensor_or_text, "numpy") else tensor_or_text
    return value.decode() if isinstance(value, bytes) else str(value)


def first_half_of_merge(checkpoint_prefixes, destination_prefix):
    """What TF's MergeV2Checkpoints does before it writes the merged index: renames every
    shard's data file to its final name (over an older checkpoint's, under the same name)."""
    shards, destination = [_text(prefix) for prefix in checkpoint_prefixes], _text(destination_prefix)
    for i, shard in enumerate(shards):
        os.replace(f"{shard}.data-00000-of-00001", f"{destination}.data-{i:05d}-of-{len(shards):05d}")


def _kill_in_save(where, call):
    import tensorflow as tf
    from tensorflow.python.checkpoint import checkpoint_management, functional_saver

    saves = []

    def tick(save, before_kill=lambda: None):
        # CheckpointManager moves its pointer twice per save (same path): count saves, not calls.
        if saves and saves[-1] == save and where == "before_pointer":
            return
        saves.append(save)
        if len(saves) == call:
            before_kill()
            print(f"fault_injection: killing inside save {call} ({where}: {save})", flush=True)
            _kill_now()

    if where == "after_data":
        write_shard = functional_saver._single_shard_save

        def after_data(file_prefix, *args, **kwargs):
            result = write_shard(file_prefix, *args, **kwargs)
            tick(_text(file_prefix))
            return result

        functional_saver._single_shard_save = after_data
    elif where == "inside_merge":
        from tensorflow.python.ops import gen_io_ops

        merge = gen_io_ops.merge_v2_checkpoints

        def inside_merge(checkpoint_prefixes, destination_prefix, *args, **kwargs):
            tick(
                _text(destination_prefix),
                before_kill=lambda: first_half_of_merge(checkpoint_prefixes, destination_prefix),
            )
            return merge(checkpoint_prefixes, destination_prefix, *args, **kwargs)

        gen_io_ops.merge_v2_checkpoints = inside_merge
    elif where == "before_pointer":
        move_pointer = checkpoint_management.update_checkpoint_state_internal

        def before_pointer(save_dir, model_checkpoint_path, *args, **kwargs):
            tick(model_checkpoint_path)
            return move_pointer(save_dir, model_checkpoint_path, *args, **kwargs)

        # CheckpointManager (backup/) calls the module's function; Model.save_weights the public
        # alias, which tf_keras reaches through tensorflow.compat.v2.
        checkpoint_management.update_checkpoint_state_internal = before_pointer
        tf.__internal__.train.update_checkpoint_state = before_pointer
        tf.compat.v2.__internal__.train.update_checkpoint_state = before_pointer
    else:
        raise SystemExit(f"fault_injection: unknown kill_in_save {where!r}")


def fill_disk(directory):
    """Writes DIR/filler until the file system is full, down to its last block."""
    with open(os.path.join(directory, "filler"), "wb", buffering=0) as f:  # unbuffered: nothing left to flush
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:  # ENOSPC: on to smaller chunks, for the last partial block
                pass


def _fill_disk_after_epoch(epoch, directory):
    import tf_keras as keras

    original = keras.callbacks.CSVLogger.on_epoch_end

    def on_epoch_end(self, index, logs=None):
        original(self, index, logs)
        if index + 1 == epoch:
            fill_disk(directory)
            print(f"fault_injection: filled the disk at {directory} after epoch {epoch}", flush=True)

    keras.callbacks.CSVLogger.on_epoch_end = on_epoch_end


def main():
    fault = json.loads(os.environ.get("FAULT", "{}"))
    if "kill_at_step" in fault and fault.get("worker", 0) == _worker_index():
        _kill_at_step(fault["kill_at_step"], fault.get("seed", 0))
    if "kill_in_save" in fault and fault.get("worker", 0) == _worker_index():
        _kill_in_save(fault["kill_in_save"], fault["call"])
    if "fill_disk_after_epoch" in fault:
        _fill_disk_after_epoch(fault["fill_disk_after_epoch"], fault["path"])
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
