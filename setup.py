"""mcl_det: Mutual Contrastive Learning pretraining -> detectron2 transfer.

torch/torchvision are installed first by ``tools/bootstrap.sh`` (pinned wheels), and detectron2 by
``tools/install_detectron2.py`` (it is not published under its own name); they are therefore not
listed in ``install_requires`` so that pip never pulls another torch.
"""

from setuptools import find_packages, setup

setup(
    name="mcl_det",
    version="0.1.0",
    description="Mutual Contrastive Learning (MCL) pretraining and detectron2 detection transfer",
    python_requires=">=3.10",
    packages=find_packages(include=("mcl_det", "mcl_det.*")),
    package_data={"mcl_det.study": ["figures.json"]},
    install_requires=[
        "numpy",
        "yacs>=0.1.8",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "pycocotools>=2.0.2",
        "opencv-python",
        "Pillow",
        "matplotlib",
        "tensorboard",
        "tqdm",
        "termcolor",
        "tabulate",
        "scipy>=1.11",
        "cloudpickle",
        "omegaconf>=2.1",
        "hydra-core>=1.1",
        "PyYAML",
        "submitit>=1.5",
    ],
    extras_require={"dev": ["pytest", "ruff"]},
)
