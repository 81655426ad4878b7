"""A ``Dataset.map`` for functions that only repack tensors, without per-epoch graph optimisation.

Every iterator of a dataset (one per epoch in ``fit``) instantiates its map
functions. tf.data instantiates them as multi-device functions, which runs
Grappler on each one: ~4 ms per epoch on a 2-core CPU even for a function that
only moves tensors into a `TeacherTargets`, 5-8 % of a small student's epoch
(issue 15). A function marked ``experimental_ints_on_device`` is instantiated
as a single-device function, without Grappler (tensorflow/core/data/
captured_function.cc, ``FunctionMetadata::Create``).

That is only right for functions that capture nothing, run on the tf.data
device anyway and return no ``int32`` tensors (which such a function keeps
in device memory; MakeIterator then fails): `pack_map` is used for the in-step placement's packing map
alone. It reads private TensorFlow names (``StructuredFunctionWrapper``,
``gen_dataset_ops.map_dataset``, ``UnaryDataset``); if they change it falls
back to ``dataset.map`` (same elements, ~4 ms more per epoch), and
``tests/test_online_teacher.py::test_pack_map_canary`` fails with the name.
"""

from __future__ import annotations

import tensorflow as tf

try:  # private TensorFlow modules: see the module docstring
    from tensorflow.python.data.ops import dataset_ops as _dataset_ops
    from tensorflow.python.data.ops import structured_function as _structured_function
    from tensorflow.python.ops import gen_dataset_ops as _gen_dataset_ops

    _BASE = _dataset_ops.UnaryDataset
except (ImportError, AttributeError):  # pragma: no cover - depends on the TF version
    _BASE = None

ATTRIBUTE = "experimental_ints_on_device"


def pack_map(dataset: tf.data.Dataset, fn) -> tf.data.Dataset:
    """``dataset.map(fn)`` for a ``fn`` that captures nothing; instantiated without Grappler."""
    if _BASE is None:
        return dataset.map(fn)
    try:
        return _PackMapDataset(dataset, fn)
    except (AttributeError, TypeError):  # a changed private API: the public map
        return dataset.map(fn)


if _BASE is not None:

    class _PackMapDataset(_BASE):
        """A sequential map dataset whose function is single-device (see the module docstring)."""

        def __init__(self, input_dataset, fn):
            self._input_dataset = input_dataset
            self._name = None
            self._map_func = _structured_function.StructuredFunctionWrapper(
                fn, "Dataset.map()", dataset=input_dataset, defun_kwargs={ATTRIBUTE: True})
            if self._map_func.function.captured_inputs:
                raise TypeError("pack_map takes only functions that capture no tensors")
            outputs = tf.nest.flatten(self._map_func.output_structure, expand_composites=True)
            if any(isinstance(s, tf.TensorSpec) and s.dtype == tf.int32 for s in outputs):
                # Such a function keeps int32 results in device memory, and
                # MakeIterator then fails ("Expected only one fetch node").
                raise TypeError("pack_map does not return int32 tensors")
            variant = _gen_dataset_ops.map_dataset(
                input_dataset._variant_tensor,
                self._map_func.function.captured_inputs,
                f=self._map_func.function,
                use_inter_op_parallelism=True,
                preserve_cardinality=True,
                force_synchronous=False,
                **self._common_args,
            )
            super().__init__(input_dataset, variant)

        def _functions(self):
            return [self._map_func]

        @property
        def element_spec(self):
            return self._map_func.output_structure
