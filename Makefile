# Developer shortcuts. `make docs` builds the documentation (warnings are errors),
# running every tutorial in tutorials/; open docs/_build/html/index.html.

SPHINXBUILD ?= sphinx-build
SPHINXOPTS  ?=

.PHONY: docs docs-clean

docs:
	$(SPHINXBUILD) -W -b html $(SPHINXOPTS) docs docs/_build/html

# Remove the built pages and everything sphinx-gallery generated.
docs-clean:
	rm -rf docs/_build docs/auto_tutorials docs/gen_modules docs/sg_execution_times.rst
