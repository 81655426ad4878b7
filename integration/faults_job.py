"""One training process of the fault test (run by test_faults.py).

Usage: python faults_job.py WORKDIR KILL_AT_STEP [WORKDIR KILL_AT_STEP ...]
Trains a student from a teacher-logit cache with HardSampleReweighting and
BackupAndRestore; kills itself with SIGKILL after KILL_AT_STEP training steps
(-1: never). Prints the final optimizer step count on success. Several
WORKDIR KILL_AT_STEP pairs run one after the other in this process (the test
resumes all its kill points in one process: one TensorFlow start-up, not three).
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kd  # noqa: E402

N, BATCH, EPOCHS = 256, 32, 4


class KillAt(keras_kd._compat.callback_base()):
    def __init__(self, at):
        super().__init__()
        self.at, self.steps = at, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main(workdir, kill_at):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 16)).astype("float32")
    y = rng.integers(0, 4, size=N)
    keras.utils.set_random_seed(0)
    teacher = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(4)])
    student = keras.Sequential([keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(4)])
    cached = tf.data.Dataset.from_tensor_slices((x, y)).apply(
        keras_kd.cache_teacher_logits(teacher, os.path.join(workdir, "cache"), verbose=0))
    rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, num_examples=N,
                                         backup_dir=os.path.join(workdir, "reweighting"))
    student.compile(keras.optimizers.SGD(0.05), loss=keras_kd.DistillationLoss())
    student.fit(rew.attach(cached.batch(BATCH)), epochs=EPOCHS, verbose=0,
                callbacks=[rew, keras.callbacks.BackupAndRestore(os.path.join(workdir, "backup")), KillAt(kill_at)])
    print(f"STEPS {workdir} {int(student.optimizer.iterations.numpy())}", flush=True)
    print(f"WEIGHTS {workdir} {float(rew.table.weights.numpy().sum()):.6f}", flush=True)


if __name__ == "__main__":
    for i in range(1, len(sys.argv), 2):
        main(sys.argv[i], int(sys.argv[i + 1]))
