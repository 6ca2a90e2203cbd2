-- A client's submission, on the job's own keys: mark a new id 'queued' (states.JobStatus.QUEUED) so a resuming
-- reader can tell a waiting job from an unknown id. An id whose outcome expired from the replay is new again.
-- KEYS[1] state hash, KEYS[2] replay stream; ARGV[1] ttl (s)
-- Returns 1 when this call created the marker, 0 when the id was already known (its expiry is left alone).
local status = redis.call('HGET', KEYS[1], 'status')
if (status == 'done' or status == 'failed' or status == 'cancelled') and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('DEL', KEYS[1])
  status = false
end
if status then return 0 end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
