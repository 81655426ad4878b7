"""The public API before the restructure (commit 06edccc) still works today.

``OLD_API`` was read from ``git show 06edccc:keras_kd/<module>.py`` with ``ast``
(every top-level name without a leading underscore, the module's ``__all__``,
the parameters of public functions, class constructors and public methods).
Each entry: ``("value",)``, ``("function", positional, keyword_only)`` or
``("class", (positional, keyword_only) or None, {method: (positional, keyword_only) or None})``.
New keyword arguments are allowed; removing or renaming one, or moving an old
positional parameter, breaks callers.
"""

import importlib
import inspect
import subprocess
import sys
import textwrap

import pytest

import keras_kd

OLD_API = {'alignment': {'Aligned': ('class',
                           (['student', 'teacher', 'pairs'],
                            ['projector', 'feature_loss', 'weight', 'init', 'resample',
                             'teacher_pool_size']),
                           {'attach': (['dataset'], ['num_parallel_calls']),
                            'cache_features': (['directory'],
                                               ['dtype', 'batch_size', 'on_mismatch', 'in_memory',
                                                'overwrite']),
                            'export': (['custom_objects'], []),
                            'feature_weight': None,
                            'loss': (['kd'], []),
                            'summary': (['print_fn'], [])}),
               'AlignmentPair': ('class',
                                 (['student_layer', 'teacher_layer', 'student_shape', 'teacher_shape',
                                   'projector', 'steps', 'feature_loss', 'weight', 'init'],
                                  []),
                                 {}),
               'FEATURE_LOSSES': ('value',),
               'FeatureLoss': ('value',),
               'align': ('function', ['student', 'teacher', 'pairs'],
                         ['projector', 'feature_loss', 'weight', 'init', 'resample', 'teacher_pool_size']),
               'attention_map': ('function', ['features', 'p'], []),
               'attention_transfer': ('function', ['teacher_features', 'student_features', 'p'], []),
               'feature_cosine': ('function', ['teacher_features', 'student_features'], []),
               'feature_l1': ('function', ['teacher_features', 'student_features'], []),
               'feature_mse': ('function', ['teacher_features', 'student_features'], []),
               'get_feature_loss': ('function', ['identifier'], [])},
 'cache': {'CacheCorruptedError': ('value',),
           'CacheMismatchError': ('value',),
           'FORMAT': ('value',),
           'MANIFEST': ('value',),
           'TeacherLogitCache': ('class',
                                 (['teacher', 'directory'],
                                  ['top_k', 'dtype', 'batch_size', 'augment', 'views', 'seed', 'num_shards',
                                   'shard_index', 'input_context', 'on_mismatch', 'output_index',
                                   'shard_size', 'verify', 'wait_timeout', 'verbose', 'in_memory']),
                                 {'build': (['dataset'], []), 'check_student': (['student'], [])}),
           'VERSION': ('value',),
           'cache_teacher_logits': ('function', ['teacher', 'directory'],
                                    ['top_k', 'dtype', 'batch_size', 'augment', 'views', 'seed',
                                     'num_shards', 'shard_index', 'input_context', 'on_mismatch',
                                     'output_index', 'shard_size', 'verify', 'wait_timeout', 'verbose',
                                     'in_memory']),
           'read_manifest': ('function', ['directory'], [])},
 'callbacks': {'BackupCorruptedError': ('value',),
               'DistillationScheduler': ('class', (['temperature', 'alpha', 'loss'], []),
                                         {'on_epoch_begin': (['epoch', 'logs'], []),
                                          'on_epoch_end': (['epoch', 'logs'], [])}),
               'HardSampleReweighting': ('class',
                                         (['signal', 'strength', 'warmup_epochs', 'clip', 'momentum',
                                           'num_examples', 'scoring_data', 'backup_dir', 'histogram_dir',
                                           'verbose'],
                                          []),
                                         {'attach': (['dataset'], []),
                                          'get_config': ([], []),
                                          'get_state': ([], []),
                                          'on_epoch_begin': (['epoch', 'logs'], []),
                                          'on_epoch_end': (['epoch', 'logs'], []),
                                          'on_test_begin': (['logs'], []),
                                          'on_test_end': (['logs'], []),
                                          'on_train_begin': (['logs'], []),
                                          'on_train_end': (['logs'], []),
                                          'score': (['dataset'], []),
                                          'set_state': (['state'], []),
                                          'table': None}),
               'SIGNALS': ('value',),
               'Schedule': ('value',),
               'constant': ('function', ['value'], []),
               'cosine': ('function', ['start', 'end', 'epochs'], []),
               'linear': ('function', ['start', 'end', 'epochs'], []),
               'normalise': ('function', ['weights', 'clip'], []),
               'raw_weights': ('function', ['signal', 'difficulty', 'strength'], []),
               'signal_kl': ('function', ['labels', 'teacher_logits', 'student_logits', 'soft'], []),
               'signal_student_ce': ('function', ['labels', 'teacher_logits', 'student_logits', 'soft'],
                                     []),
               'signal_teacher_ce': ('function', ['labels', 'teacher_logits', 'student_logits', 'soft'],
                                     []),
               'signal_teacher_entropy': ('function',
                                          ['labels', 'teacher_logits', 'student_logits', 'soft'], []),
               'signal_teacher_wrong': ('function', ['labels', 'teacher_logits', 'student_logits', 'soft'],
                                        []),
               'signal_wsld': ('function', ['labels', 'teacher_logits', 'student_logits', 'soft'], []),
               'step': ('function', ['boundaries', 'values'], [])},
 'data': {'add_example_ids': ('function', ['dataset'], []),
          'with_teacher': ('function', ['dataset', 'teacher'],
                           ['placement', 'output_index', 'num_parallel_calls'])},
 'losses': {'DIVERGENCES': ('value',),
            'DistillationLoss': ('class',
                                 (['temperature', 'alpha', 'divergence', 'hard_loss',
                                   'scale_by_temperature_squared', 'topk_fill', 'reduction', 'name'],
                                  []),
                                 {'add_observer': (['observer'], []),
                                  'add_weighting': (['weighting'], []),
                                  'alpha': None,
                                  'alpha_variable': None,
                                  'call': (['y_true', 'y_pred'], []),
                                  'components': (['y_true', 'y_pred'], []),
                                  'distillation_term': (['teacher_logits', 'student_logits'], []),
                                  'from_config': (['config'], []),
                                  'get_config': ([], []),
                                  'hard_term': (['labels', 'student_logits'], []),
                                  'remove_observer': (['observer'], []),
                                  'remove_weighting': (['weighting'], []),
                                  'temperature': None,
                                  'temperature_variable': None,
                                  'terms': (['y_true', 'y_pred'], [])}),
            'Divergence': ('value',),
            'Observer': ('class', None, {}),
            'StepTerms': ('class', (['targets', 'hard', 'soft'], []), {}),
            'Weighting': ('class', None, {}),
            'binary_hard_loss': ('function', ['labels', 'student_logits'], []),
            'default_hard_loss': ('function', ['labels', 'student_logits'], []),
            'forward_kl': ('function', ['teacher_logits', 'student_logits'], []),
            'get_divergence': ('function', ['identifier'], []),
            'jensen_shannon': ('function', ['teacher_logits', 'student_logits'], []),
            'logit_huber': ('function', ['teacher_logits', 'student_logits', 'delta'], []),
            'logit_mse': ('function', ['teacher_logits', 'student_logits'], []),
            'nan_where_invalid': ('function', ['values', 'valid', 'message'], []),
            'reduce_values': ('function',
                              ['values', 'sample_weight', 'mask', 'reduction', 'scale_for_replicas'], []),
            'reverse_kl': ('function', ['teacher_logits', 'student_logits'], []),
            'soft_cross_entropy': ('function', ['teacher_logits', 'student_logits'], [])},
 'metrics': {'loss_components': ('function', ['loss'], []),
             'teacher_agreement': ('function', ['y_true', 'y_pred'], [])},
 'optimize': {'Pruning': ('class', (['model', 'callbacks'], []), {}),
              'TFLiteConversionError': ('class', None, {}),
              'check_num_classes': ('function', ['student', 'teacher'], []),
              'evaluate_tflite': ('function', ['tflite', 'dataset'],
                                  ['batch_size', 'return_logits', 'num_threads', 'output']),
              'file_size': ('function', ['obj'], ['compressed']),
              'prune_for_distillation': ('function', ['student', 'target_sparsity'],
                                         ['end_step', 'begin_step', 'initial_sparsity', 'power',
                                          'frequency', 'layers', 'block_size', 'block_pooling_type',
                                          'teacher', 'log_dir']),
              'quantize_for_distillation': ('function', ['student'],
                                            ['layers', 'preserve_sparsity', 'scheme', 'teacher',
                                             'custom_objects']),
              'sparsity': ('function', ['model'], []),
              'strip': ('function', ['model'], []),
              'to_keras3': ('value',),
              'to_tf_keras': ('value',),
              'to_tflite': ('function', ['model', 'representative_data'],
                            ['int8', 'io_dtype', 'path', 'num_calibration_examples'])},
 'targets': {'Nested': ('value',),
             'TeacherTargets': ('class',
                                (['labels', 'logits', 'topk_indices', 'topk_values', 'topk_logsumexp',
                                  'inputs', 'teacher_key', 'example_id', 'has_labels'],
                                 []),
                                {'device': None,
                                 'dtype': None,
                                 'has_teacher': None,
                                 'kind': None,
                                 'replace': ([], []),
                                 'shape': None,
                                 'with_labels': (['labels'], [])}),
             'dense_teacher_logits': ('function', ['targets', 'num_classes', 'topk_fill'], []),
             'is_targets': ('function', ['y'], []),
             'materialize': ('function', ['targets'], []),
             'register_teacher': ('function', ['fn', 'key'], []),
             'teacher_output': ('function', ['outputs', 'output_index'], []),
             'unregister_teacher': ('function', ['key'], [])},
 'tuning': {'BayesianOptimization': ('class', None, {}),
            'DistillationChoices': ('class',
                                    (['loss', 'learning_rate', 'reweighting', 'alignment_weight'], []),
                                    {'optimizer': (['flavour'], [])}),
            'DistillationHyperModel': ('class', (['build_student', 'metrics'], []),
                                       {'build': (['hp'], []),
                                        'fit': (['hp', 'model', 'x'], ['callbacks'])}),
            'Hyperband': ('class', None, {}),
            'OBJECTIVE_DIRECTIONS': ('value',),
            'RandomSearch': ('class', None, {}),
            'Range': ('value',),
            'SIZE_ACCURACY': ('value',),
            'TFLITE_INT8_ACCURACY': ('value',),
            'TFLITE_SIZE_KIB': ('value',),
            'distillation_hyperparameters': ('function', ['hp'],
                                             ['temperature', 'alpha', 'divergence', 'learning_rate',
                                              'reweighting_signal', 'reweighting_strength',
                                              'reweighting_warmup_epochs', 'alignment_weight'])}}

# `keras_kd.__all__` at 06edccc, with the module each name came from.
OLD_TOP_LEVEL = {
    "Aligned": "alignment",
    "CacheCorruptedError": "cache",
    "CacheMismatchError": "cache",
    "DIVERGENCES": "losses",
    "DistillationHyperModel": "tuning",
    "DistillationLoss": "losses",
    "DistillationScheduler": "callbacks",
    "HardSampleReweighting": "callbacks",
    "TeacherLogitCache": "cache",
    "TeacherTargets": "targets",
    "add_example_ids": "data",
    "align": "alignment",
    "cache_teacher_logits": "cache",
    "constant": "callbacks",
    "cosine": "callbacks",
    "distillation_hyperparameters": "tuning",
    "forward_kl": "losses",
    "jensen_shannon": "losses",
    "linear": "callbacks",
    "logit_huber": "losses",
    "logit_mse": "losses",
    "loss_components": "metrics",
    "reverse_kl": "losses",
    "soft_cross_entropy": "losses",
    "step": "callbacks",
    "teacher_agreement": "metrics",
    "tuning": None,
    "with_teacher": "data",
}

NAMES = [(module, name) for module, names in sorted(OLD_API.items()) for name in sorted(names)]
CALLABLES = [
    (module, name)
    for module, name in NAMES
    if OLD_API[module][name][0] == "function"
    or (OLD_API[module][name][0] == "class" and OLD_API[module][name][1] is not None)
]
METHODS = [
    (module, name, method)
    for module, name in NAMES
    if OLD_API[module][name][0] == "class"
    for method in sorted(OLD_API[module][name][2])
]


def _public(module, name):
    return getattr(importlib.import_module(f"keras_kd.{module}"), name)


def _check_parameters(where, callable_, positional, keyword_only):
    """Every old parameter is still accepted, old positional ones in their old order."""
    params = inspect.signature(callable_).parameters
    lost = [p for p in positional + keyword_only if p not in params]
    assert not lost, f"{where} lost parameter(s) {lost}; it now takes {list(params)}"
    now_positional = [
        p.name
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    assert now_positional[: len(positional)] == positional, (
        f"{where}: positional parameters were {positional}, now {now_positional}"
    )
    for name in keyword_only:
        assert params[name].kind != inspect.Parameter.POSITIONAL_ONLY, f"{where}: {name} is positional-only"


@pytest.mark.parametrize("module,name", NAMES, ids=[f"{m}.{n}" for m, n in NAMES])
def test_old_public_name_still_exists(module, name):
    mod = importlib.import_module(f"keras_kd.{module}")
    assert hasattr(mod, name), f"keras_kd.{module}.{name} existed at 06edccc and is gone"


@pytest.mark.parametrize("module,name", CALLABLES, ids=[f"{m}.{n}" for m, n in CALLABLES])
def test_old_signature_still_accepted(module, name):
    entry = OLD_API[module][name]
    positional, keyword_only = (entry[1], entry[2]) if entry[0] == "function" else entry[1]
    _check_parameters(f"keras_kd.{module}.{name}", _public(module, name), positional, keyword_only)


@pytest.mark.parametrize(
    "module,name,method", METHODS, ids=[f"{m}.{n}.{k}" for m, n, k in METHODS]
)
def test_old_public_method_still_exists(module, name, method):
    cls = _public(module, name)
    where = f"keras_kd.{module}.{name}.{method}"
    # Properties and methods alike: look the name up on the class without running it.
    found = inspect.getattr_static(cls, method, None)
    assert found is not None, f"{where} existed at 06edccc and is gone"
    spec = OLD_API[module][name][2][method]
    if spec is not None and not isinstance(found, property):
        positional, keyword_only = spec
        if isinstance(found, classmethod):
            function = getattr(cls, method)  # bound: no `cls` in its signature
        elif isinstance(found, staticmethod):
            function = found.__func__
        else:
            function, positional = found, ["self"] + positional
        _check_parameters(where, function, positional, keyword_only)


@pytest.mark.parametrize("name", sorted(OLD_TOP_LEVEL))
def test_old_top_level_name_still_exported(name):
    assert name in keras_kd.__all__, f"{name} left keras_kd.__all__"
    value = getattr(keras_kd, name)
    module = OLD_TOP_LEVEL[name]
    if module is not None:
        assert value is _public(module, name), (
            f"keras_kd.{name} is not keras_kd.{module}.{name}"
        )


def test_every_all_entry_resolves():
    missing = [name for name in keras_kd.__all__ if not hasattr(keras_kd, name)]
    assert not missing, f"keras_kd.__all__ names {missing}, which keras_kd lacks"


def test_import_keras_kd_loads_neither_keras_tuner_nor_tfmot():
    # A fresh interpreter: this test process may have imported them already.
    script = textwrap.dedent(
        """
        import sys
        import keras_kd
        heavy = sorted(
            m for m in sys.modules
            if m.split(".")[0] in ("keras_tuner", "tensorflow_model_optimization")
        )
        print("LOADED:" + ",".join(heavy))
        keras_kd.optimize
        keras_kd.tuning
        print("REACHED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.split("LOADED:")[1].splitlines()[0]
    assert loaded == "", f"`import keras_kd` imported {loaded}"
    assert "REACHED" in result.stdout
