"""tf.data transforms that prepare a dataset for distillation.

* `with_teacher` (`online`): the online teacher attaches its logits to every batch.
* `add_example_ids`, `unlabelled` (`ids`): example ids for reweighting; transfer sets.
* `mixup` (`mixup`): mixup/cutmix before the teacher, for consistent teaching.

The teacher-logit cache (`keras_kd.cache`) plugs into the same targets contract.
"""

from keras_kd.data.ids import add_example_ids
from keras_kd.data.ids import unlabelled
from keras_kd.data.mixup import mixup
from keras_kd.data.online import with_teacher

__all__ = ["add_example_ids", "mixup", "unlabelled", "with_teacher"]
