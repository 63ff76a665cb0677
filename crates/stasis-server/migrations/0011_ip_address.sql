-- A running computer's address on its host (the host end of its network), what the API
-- shows as ip_address; cleared when it stops.
ALTER TABLE computers ADD COLUMN ip_address TEXT;
