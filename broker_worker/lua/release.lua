-- Hand a running job back (worker shutting down): it keeps its text; the next worker resumes it.
-- KEYS[1] state hash; ARGV[1] fencing token. Returns 1 if released, 0 if the caller no longer owned it.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', 'released', 'owner', '')
return 1
