-- Keep a running job's keys alive while the caller owns it. Returns states.Ownership: 1 owned, 0 taken over,
-- 2 owned but cancelled.
-- KEYS[1] state hash, KEYS[2] replay stream, KEYS[3] cancel key; ARGV[1] fencing token, ARGV[2] ttl (s)
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then return 2 end
return 1
