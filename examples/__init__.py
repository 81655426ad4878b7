"""keras_kd's examples: the `make demo` pipeline (``python examples/demo.py``).

They use only keras_kd's public API and need the demo extra:
``pip install keras-kd[demo]`` (scikit-learn, matplotlib, mnist1d).
"""
