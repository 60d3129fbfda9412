async def test_the_app_is_ready_on_a_migrated_database(client):
    response = await client.get("/health/ready")

    assert response.status_code == 200, response.text
