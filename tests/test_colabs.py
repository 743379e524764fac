"""The notebooks in colabs/: they match their generator, carry no outputs, and run top to bottom on CPU with the
tiny settings (JAXSSL_COLAB_TINY=1) in a fresh Jupyter kernel; any cell error fails the test."""

import importlib.util
import os
import sys

import nbclient  # the `colab` extra (in `dev`): a missing install fails rather than skipping
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLABS = os.path.join(ROOT, 'colabs')
spec = importlib.util.spec_from_file_location('make_notebooks', os.path.join(COLABS, 'make_notebooks.py'))
make_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_notebooks)
NAMES = list(make_notebooks.NOTEBOOKS)


@pytest.mark.parametrize('name', NAMES)
def test_notebook_is_generated_and_has_no_outputs(name):
    with open(os.path.join(COLABS, name)) as f:
        notebook = nbformat.read(f, as_version=4)
    nbformat.validate(notebook)
    want = make_notebooks.build(make_notebooks.NOTEBOOKS[name])  # compared as cells, not bytes: nbformat versions vary
    cells = lambda nb: [(cell.cell_type, cell.source) for cell in nb.cells]
    assert cells(notebook) == cells(want), f'colabs/{name} is stale: run python colabs/make_notebooks.py'
    assert notebook.metadata == want.metadata
    code = [cell for cell in notebook.cells if cell.cell_type == 'code']
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert 'JAXSSL_COLAB_TINY' in code[0].source and 'pip' in code[0].source  # install cell first


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """One runs folder for the module, so finetune.ipynb reuses the quickstart's pretraining as a user would."""
    return tmp_path_factory.mktemp('colab_runs')


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_notebook_runs_on_cpu(name, runs, monkeypatch):
    monkeypatch.setenv('JAXSSL_COLAB_TINY', '1')
    monkeypatch.setenv('JAXSSL_COLAB_WORKDIR', str(runs))
    monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
    monkeypatch.delenv('XLA_FLAGS', raising=False)  # conftest's 8 fake devices: the kernel gets the real one
    monkeypatch.delenv('JAXSSL_CHECKPOINT', raising=False)
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the kernel's inline backend renders the figures
    monkeypatch.setenv('PATH', os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH'])  # this venv's python
    with open(os.path.join(COLABS, name)) as f:
        notebook = nbformat.read(f, as_version=4)
    client = nbclient.NotebookClient(
        notebook, kernel_name='python3', timeout=600, resources={'metadata': {'path': COLABS}}
    )
    client.execute()  # raises CellExecutionError naming the cell on any error
    errors = [o for cell in notebook.cells for o in cell.get('outputs', []) if o.get('output_type') == 'error']
    assert not errors
    if name == 'quickstart.ipynb':
        images = [o for c in notebook.cells for o in c.get('outputs', []) if 'image/png' in o.get('data', {})]
        assert len(images) == 2  # the loss plot and the reconstructions
        assert (runs / 'pretrain' / 'summary.json').is_file()
    if name == 'finetune.ipynb':
        assert (runs / 'pretrain_finetune' / 'summary.json').is_file()
    if name == 'convert.ipynb':
        assert (runs / 'converted' / 'jaxssl_params.json').is_file()
