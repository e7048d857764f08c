"""gymtrl's vLLM plugin (on-policy prefix correction) and its installer.

splice.py and plugin.py import nothing from gymtrl or its dependencies: they are packaged on their
own as `gymtrl_vllm_plugin` and installed into the vLLM environment (install.py).
"""
