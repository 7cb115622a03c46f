"""Suite-wide settings: decoded datasets are cached in a temporary folder, never in the user's home."""
import pytest


@pytest.fixture(scope='session', autouse=True)
def _dataset_cache_in_a_temporary_folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('ROBUST_RESNETS_CACHE', str(tmp_path_factory.mktemp('robust_resnets_cache')))
        yield
