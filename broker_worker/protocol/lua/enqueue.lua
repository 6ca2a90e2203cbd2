-- Queue a job entry unless the model's queue is full, atomically (so concurrent admissions cannot overshoot).
-- KEYS[1] the job stream of the model's lane (the limit counts that lane only); ARGV[1] job JSON, ARGV[2] limit on queued + running entries (0: none)
-- Returns the new entry id, or {'full', depth}. Processed entries are deleted, so XLEN is queued + running.
local limit = tonumber(ARGV[2])
if limit > 0 then
  local depth = redis.call('XLEN', KEYS[1])
  if depth >= limit then return {'full', depth} end
end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[1])
