"""Training data: build a licence-filtered, deduplicated, decontaminated corpus (training tokenizes it as it reads)."""

from codellm.data.build import BuildConfig, build_corpus
from codellm.data.decontam import Decontaminator
from codellm.data.filters import FilterConfig
from codellm.data.shards import read_corpus
from codellm.data.sources import License, Package, Source, open_source, stdlib_source

__all__ = ["BuildConfig", "Decontaminator", "FilterConfig", "License", "Package", "Source", "build_corpus",
           "open_source", "read_corpus", "stdlib_source"]
