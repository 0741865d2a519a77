"""System checks that warn about settings unsafe in production."""
