"""The collection check that every engine- or server-starting test carries its marker."""

from helpers.markers import unmarked

pytest_plugins = ["pytester"]

SOURCE = """
import pytest

def running_server():
    yield

def make_llm():
    return None

@pytest.fixture
def server():
    with running_server():
        yield "url"

@pytest.fixture
def client(server):  # starts a server through another fixture
    return server

@pytest.fixture
def engines():
    return None

def test_server_unmarked(client):
    pass

@pytest.mark.server
def test_server_marked(client):
    pass

def test_pool_unmarked(engines):
    pass

@pytest.mark.engine
def test_pool_marked(engines):
    pass

def test_direct_engine_unmarked():
    make_llm()

def test_plain():
    assert 1
"""


def test_unmarked_finds_exactly_the_tests_without_their_marker(pytester):
    pytester.makeini("[pytest]\nmarkers =\n    engine: e\n    server: s\n")
    items = pytester.getitems(SOURCE)
    assert len(items) == 6
    problems = [p.split("::")[1] for p in unmarked(items)]
    assert problems == [
        "test_server_unmarked: needs server",
        "test_pool_unmarked: needs engine",
        "test_direct_engine_unmarked: needs engine",
    ]
