"""Search a trained model's aligned space: embed a gallery store, index it with faiss, query it."""

from m3jepa.search.embed import Embedded, embed_run, embed_store
from m3jepa.search.errors import SearchError
from m3jepa.search.folder import index_folder
from m3jepa.search.gallery import index_store, index_stores
from m3jepa.search.index import Hit, SearchIndex
from m3jepa.search.plan import IndexPlan, choose
from m3jepa.search.searcher import Searcher

__all__ = ["Embedded", "Hit", "IndexPlan", "SearchError", "SearchIndex", "Searcher", "choose", "embed_run",
           "embed_store", "index_folder", "index_store", "index_stores"]
