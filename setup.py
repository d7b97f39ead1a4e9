"""sigma_jax: SIGMA (semantic-grounded instruction-driven generative recommender) in JAX/Flax."""
import setuptools

setuptools.setup(
    name="sigma_jax",
    version="0.1.0",
    description="JAX/Flax implementation of SIGMA, a semantic-ID generative multi-task recommender.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["sigma_jax", "sigma_jax.*"]),
    package_data={"sigma_jax": ["data/demo/*"]},
    install_requires=[
        # Pinned: each has wheels for CPython 3.11 and 3.12 on linux x86_64 / aarch64.
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "array-record==0.8.6",
        "grain==0.2.18",
        "sentencepiece==0.2.3",
        "numpy>=2.0,<2.5",
        "ml-collections==1.1.0",
        "absl-py>=2.1",
        "etils[epath]>=1.7",
        "importlib_resources>=6.0",  # tensorflow-datasets needs it but does not declare it
        "tqdm>=4.66",
        "tensorboardX==2.6.5",  # TensorBoard event files beside each stage's metrics.jsonl
        "matplotlib==3.11.2",  # sigma_jax.plots
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-xdist==3.8.0", "nbclient==0.11.0", "nbformat==5.11.1",
                 "ipykernel==7.4.0"],
        # The accelerator builds of the pinned JAX (jax's own extras: CUDA 12 plugin, libtpu).
        "gpu": ["jax[cuda12]==0.10.2"],
        "tpu": ["jax[tpu]==0.10.2"],
    },
)
