"""The http(s):// source without a server: which links of an index page are children, and which URLs may carry
credentials. Against a real HTTP server: tests/component/test_source_http.py."""

from __future__ import annotations

import pytest

from directfs.errors import ConfigError
from directfs.sources.base import Credentials
from directfs.sources.web import create, index_links
from tests.support.sourcetree import options


@pytest.mark.expected_logs(r"^index of .*: skipping")
def test_index_links_keep_only_children() -> None:
    page = """
      <a href="?C=N;O=D">sort</a> <a href="../">up</a> <a href="/">root</a> <a href="#x">anchor</a>
      <a href="http://other.example/d/a">other host</a> <a href="https://h/d/a">other scheme</a>
      <a href="a">a</a> <a href="/d/a">a again</a> <a href="http://h/d/b%20c/">b c</a> <a href="e/f">deeper</a>
      <a href="g?download=1">query</a> <a href="%2e%2e">dotdot</a> <a href="x%2Fy">slash</a> <a href="%ff">bad</a>
    """
    assert index_links("http://h/d/", page) == [("a", False), ("b c", True)]


def test_plain_http_credentials_only_to_loopback() -> None:
    with pytest.raises(ConfigError, match="clear text"):
        create("http://files.example.org/x/", options(credentials=Credentials(token="t")))
    create("http://files.example.org/x/", options())  # anonymous plain HTTP is fine
    with pytest.raises(ConfigError):
        create("https://user:pw@files.example.org/x/", options())
