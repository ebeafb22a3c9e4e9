"""The only place that imports megatron-core: seqpar's mixers as a Megatron layer spec
(`spec.py`, `--spec seqpar.megatron.spec layer_spec`), the model as a GPTModel with Megatron's groups
(`model.py`), weight conversion to and from the plain model (`convert.py`), a megatron-core
training step (`train_step.py`), the GPU check (`gpu_check.py`) and the import of Megatron-LM
configs (`config_import.py`, which needs no megatron-core). Import the submodules you need."""
