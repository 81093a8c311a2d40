"""Router tuning: data and the trainer."""
