"""tf.data transforms that prepare a dataset for distillation.

* `with_teacher` (`online`): the online teacher attaches its logits to every batch.
* `add_example_ids` (`ids`): numbers examples for per-example reweighting.

The teacher-logit cache (`keras_kd.cache`) plugs into the same targets contract.
"""

from keras_kd.data.ids import add_example_ids
from keras_kd.data.online import with_teacher

__all__ = ["add_example_ids", "with_teacher"]
