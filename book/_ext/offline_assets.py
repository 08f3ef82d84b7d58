"""The book reads offline: the Colab badge image comes from the book itself, not from colab.research.google.com.

The notebooks keep the remote badge, which GitHub and Colab show; in the built pages it becomes
``_static/colab-badge.svg`` (the link still opens Colab, which needs the internet anyway). MathJax comes from
``sphinx-mathjax-offline`` and ``nb_ipywidgets_js: {}`` drops the widget scripts (_config.yml); ``check_offline.py``
then fails the build if a page still loads a script, style sheet or image from the web.
"""

from docutils import nodes
from sphinx.transforms import SphinxTransform

REMOTE_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "/_static/colab-badge.svg"  # a leading / is the book's source folder


class LocalColabBadge(SphinxTransform):
    default_priority = 400  # before the image collector copies the images it finds

    def apply(self, **kwargs) -> None:
        for image in self.document.findall(nodes.image):
            if image["uri"] == REMOTE_BADGE:
                image["uri"] = LOCAL_BADGE
                image["candidates"] = {"*": LOCAL_BADGE.lstrip("/")}


def setup(app):
    app.add_transform(LocalColabBadge)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
