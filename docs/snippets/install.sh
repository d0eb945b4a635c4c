# Python 3.11+, CPU or CUDA. constraints.txt pins the versions tested together
# (and the CPU build of torch on machines without a GPU).
pip install -c constraints.txt -e ".[all]"
