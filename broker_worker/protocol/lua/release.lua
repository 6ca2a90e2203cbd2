-- Give a running job back to the queue: it keeps its text; the next worker resumes it.
-- KEYS[1] state hash; ARGV[1] fencing token; ARGV[2] new status: 'released' (worker shutting down: the next
-- start does not count an attempt) or 'retry' (a transient failure such as CUDA OOM: it does).
-- Returns 1 if released, 0 if the caller no longer owned the job. Statuses: states.JobStatus.
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'owner', '')
return 1
