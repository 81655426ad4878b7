"""One process of the multi-worker test (run by test_multiworker.py).

Usage: python multiworker_job.py OUT.json CACHE_DIR NUM_SHARDS SHARD_INDEX
with TF_CONFIG set for MultiWorkerMirroredStrategy (or unset for one worker;
test_multiworker.py calls `main` in the test process for that case).
Builds this worker's part of a shared teacher-logit cache, trains a student
with DistillationLoss and HardSampleReweighting, and writes the per-epoch
losses and the reweighting table to OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402  (Keras 3.15's fit fails under MultiWorkerMirroredStrategy, without keras_kd too)

import keras_kd  # noqa: E402
from keras_kd.callbacks import backup as _reweighting_backup  # noqa: E402
try:  # imported by test_multiworker.py, which runs the one-worker case in the test process
    from integration.digits import load_digits_split  # noqa: E402
except ImportError:  # run as a script: integration/digits.py is next to it
    from digits import load_digits_split  # noqa: E402

N, BATCH, EPOCHS = 512, 64, 3


def main(out, cache_dir, num_shards, shard_index):
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if "TF_CONFIG" in os.environ else None
    x_train, _, y_train, _ = load_digits_split()
    x, y = x_train[:N], y_train[:N]
    keras.utils.set_random_seed(0)  # the same teacher and student weights in every process
    teacher = keras.Sequential([keras.Input((64,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    init = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(10)])
    weights = init.get_weights()
    cache = keras_kd.cache_teacher_logits(
        teacher, cache_dir, batch_size=BATCH, verbose=0,
        num_shards=num_shards if num_shards > 1 else None,
        shard_index=shard_index if num_shards > 1 else None,
        wait_timeout=300,
    )
    cached = tf.data.Dataset.from_tensor_slices((x, y)).apply(cache)
    # Count the backup writes of this process: only the chief may write.
    saves, save = [], _reweighting_backup.ReweightingBackup.save

    def counted(self, epoch, *args):
        saves.append(int(epoch))
        return save(self, epoch, *args)

    _reweighting_backup.ReweightingBackup.save = counted
    try:
        rew = keras_kd.HardSampleReweighting(signal="kl", warmup_epochs=1, momentum=0.5, num_examples=N,
                                             backup_dir=cache_dir.rstrip("/") + "-reweighting")
        train = rew.attach(cached.batch(BATCH))
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train = train.with_options(options)
        with strategy.scope() if strategy else tf.distribute.get_strategy().scope():
            student = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"),
                                        keras.layers.Dense(10)])
            student.set_weights(weights)
            student.compile(keras.optimizers.SGD(0.1), loss=keras_kd.DistillationLoss(temperature=2.0, alpha=0.3))
        history = student.fit(train, epochs=EPOCHS, verbose=0, callbacks=[rew])
        state = rew.get_state()
        with open(out, "w") as f:
            json.dump({"loss": history.history["loss"], "weights": state["weights"].tolist(),
                       "stats": np.nan_to_num(state["stats"], nan=-1.0).tolist(), "backup_saves": saves,
                       "is_chief": bool(rew._is_chief())}, f)
    finally:  # the one-worker case runs inside the test process: leave the class as it was
        _reweighting_backup.ReweightingBackup.save = save


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
