"""The teacher-logit cache: run the teacher once, distill for many epochs.

`cache_teacher_logits` returns a ``Dataset -> Dataset`` transform. Applied to
an **unbatched** dataset of ``(x, y)`` or ``(x, y, sample_weight)`` elements,
it runs the teacher (or an ensemble of teachers) over the dataset once, in
inference mode and batched, writes its logits to disk, and yields
``(x, TeacherTargets(labels=y, logits=..., example_id=i)[, sample_weight])``
for every element, in order. Later epochs and later processes only read the
files, so a distillation epoch costs what a student-only epoch costs.

The package is keras_kd's one storage engine, also used by the alignment
feature cache (`features`):

- `files`: atomic writes, safe reads, locks, directories;
- `format`: named fields in blocks of rows, the manifest schema;
- `store`: one cache directory (names, ownership, manifest, journals,
  garbage) and the rows of a finished cache (in memory or streamed);
- `build`: the one build flow (`Build.ensure`): open what matches, else
  build the part, assemble, wait for the other parts;
- `fingerprint`: digests of teachers and datasets, random-pipeline detection;
- `teacher`, `manifest`, `reader`, `transform`, `logits`: the teacher-logit
  cache (what the teacher sees, its manifest keys, the output pipeline, the
  transform, the public function);
- `features`: the alignment feature cache's table.

Nothing is pickled; any NumPy user can read the files with ``np.fromfile``
and the offsets in the manifest.
"""

from keras_kd.cache.errors import CacheCorruptedError
from keras_kd.cache.errors import CacheMismatchError
from keras_kd.cache.format import MANIFEST  # noqa: F401 - the manifest's file name
from keras_kd.cache.format import VERSION  # noqa: F401 - the storage format version
from keras_kd.cache.logits import cache_teacher_logits
from keras_kd.cache.manifest import FORMAT  # noqa: F401 - the manifest's `format`
from keras_kd.cache.manifest import read_manifest
from keras_kd.cache.transform import TeacherLogitCache

__all__ = [
    "CacheCorruptedError",
    "CacheMismatchError",
    "TeacherLogitCache",
    "cache_teacher_logits",
    "read_manifest",
]
