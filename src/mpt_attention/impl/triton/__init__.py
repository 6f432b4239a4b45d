"""The ``triton`` backend: kernels (forward.py, backward.py, common.py) and their launcher (launch.py)."""
